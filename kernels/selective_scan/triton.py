"""Triton kernels for the chunked selective scan (the CUDA path of the op).

One program per (batch b, block of BLOCK_D channels, chunk m); chunks run in parallel on
the grid, each program walks its chunk's Q positions sequentially with the state
``[BLOCK_D, N]`` in registers. The length-M scans across chunk boundaries (forward states,
reverse adjoint carries) run in torch between kernel launches (``chunked.chunk_scan``: about
``2·√M`` torch steps, so a chunk size of a few tokens does not mean one step per token). The schedule is the one of
``chunked.py`` (see README.md):

* forward: ``_fwd_local`` (chunk-local end states) → torch boundary scan → ``_fwd_out`` (y).
* backward: ``_bwd_forward_sweep`` (recompute h; y for dz, dC partials, forward half of the
  log-decay telescoping) → ``_bwd_local_reverse`` (chunk-local adjoint, L_m) → torch
  reverse boundary scan (ν_m, dh0) → ``_bwd_reverse_sweep`` (μ; du, dΔ, dB partials,
  reverse half of the telescoping).

Reductions over channels (dB, dC sum over the channels of a group; dA over batch and
chunks) are written as per-program partial sums and summed in torch: deterministic, no
atomics. BLOCK_D divides the group width so that a channel block never straddles groups.

Packed documents (``seq_idx``): ``_Prep`` turns the index into ``keep [B, T]`` (0 where a
document starts, else 1) once; every kernel multiplies the step's decay ``exp(Δ_t A)`` by
``keep_t`` (constexpr ``RESET``), and the chunk decays of the torch boundary scans by the
product of their chunk's ``keep``. Truncated mode zeroes what leaves a window a document
starts in.

Everything runs in float32 (16-bit inputs are upcast; float64 inputs are computed in float64
by Triton's fp64 arithmetic). Tested on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._args import as_grouped, compute_dtype, resets, segments, validate
from .chunked import MODES, chunk_scan

__all__ = ["selective_scan_triton_fwd", "selective_scan_triton_bwd"]


@triton.jit
def _offsets(pid_b, pid_d, D, G, N, T, rep, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_N)
    mask_d = d < D
    mask_dn = mask_d[:, None] & (n[None, :] < N)
    # Row offsets of [B, D, T] tensors and of [B, G, N, T] tensors (channel d reads group d // rep).
    row = pid_b * D * T + d * T
    grow = pid_b * G * N * T + (d // rep)[:, None] * N * T + n[None, :] * T
    return d, n, mask_d, mask_dn, row, grow


@triton.jit
def _decay(dt, A, keep_ptr, pid_b, d, t, T, md, RESET: tl.constexpr):
    """``ā_t = keep_t · exp(Δ_t A)``, ``[BLOCK_D, BLOCK_N]``; keep (``[B, T]``) is read only
    with documents (as a vector of equal entries: the interpreter rejects scalar masks)."""
    a = tl.exp(dt[:, None] * A)
    if RESET:
        k = tl.load(keep_ptr + pid_b * T + t + d * 0, mask=md, other=1.0)
        a = a * k[:, None]
    return a


@triton.jit
def _fwd_local(dt_ptr, u_ptr, B_ptr, A_ptr, keep_ptr, hloc_ptr, D, G, N, T, M, Q, rep,
               BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, RESET: tl.constexpr):
    """Chunk-local end state from a zero start: hloc[b, d, m, :]."""
    pid_b, pid_d, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, n, mask_d, mask_dn, row, grow = _offsets(pid_b, pid_d, D, G, N, T, rep, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    h = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    for q in range(Q):
        t = pid_m * Q + q
        # Vector masks (the interpreter rejects scalar-bool masks): channel valid and t < T.
        md = mask_d & (d * 0 + t < T)
        mdn = mask_dn & md[:, None]
        # Past the end Δ = 0: ā = 1, b = 0, an identity step (the padding of chunked.py).
        dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
        u = tl.load(u_ptr + row + t, mask=md, other=0.0)
        Bv = tl.load(B_ptr + grow + t, mask=mdn, other=0.0)
        h = _decay(dt, A, keep_ptr, pid_b, d, t, T, md, RESET) * h + (dt * u)[:, None] * Bv
    out = ((pid_b * D + d) * M + pid_m)[:, None] * N + n[None, :]
    tl.store(hloc_ptr + out, h, mask=mask_dn)


@triton.jit
def _fwd_out(dt_ptr, u_ptr, B_ptr, C_ptr, A_ptr, keep_ptr, hin_ptr, y_ptr, D, G, N, T, M, Q, rep,
             BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, RESET: tl.constexpr):
    """True states from the chunk's entering state hin[b, d, m]; y[b, d, t] = Σ_n C h."""
    pid_b, pid_d, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, n, mask_d, mask_dn, row, grow = _offsets(pid_b, pid_d, D, G, N, T, rep, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    st = ((pid_b * D + d) * M + pid_m)[:, None] * N + n[None, :]
    h = tl.load(hin_ptr + st, mask=mask_dn, other=0.0)
    for q in range(Q):
        t = pid_m * Q + q
        # Vector masks (the interpreter rejects scalar-bool masks): channel valid and t < T.
        md = mask_d & (d * 0 + t < T)
        mdn = mask_dn & md[:, None]
        dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
        u = tl.load(u_ptr + row + t, mask=md, other=0.0)
        Bv = tl.load(B_ptr + grow + t, mask=mdn, other=0.0)
        Cv = tl.load(C_ptr + grow + t, mask=mdn, other=0.0)
        h = _decay(dt, A, keep_ptr, pid_b, d, t, T, md, RESET) * h + (dt * u)[:, None] * Bv
        tl.store(y_ptr + row + t, tl.sum(h * Cv, axis=1), mask=md)


@triton.jit
def _adjoint_input(t, row, grow, md, mdn, A, Cv, g, dfin, dfl, w_ptr, gsh_ptr, Csh_ptr,
                   T, W, TRUNC: tl.constexpr):
    """v_t = C_t g_t (− Π_{t+1}^{t+W} ā · C_{t+W} g_{t+W} when truncated), plus the
    final-state cotangent as an output attached to h_{T-1} (and leaving the window at T-1-W:
    ``dfl``, the cotangent that leaves, zero for rows whose last window holds a reset)."""
    v = Cv * g[:, None]
    v += tl.where(t == T - 1, dfin, 0.0)
    if TRUNC:
        w = tl.load(w_ptr + row + t, mask=md, other=0.0)
        gs = tl.load(gsh_ptr + row + t, mask=md, other=0.0)
        Cs = tl.load(Csh_ptr + grow + t, mask=mdn, other=0.0)
        decay = tl.exp(w[:, None] * A)
        v -= decay * Cs * gs[:, None]
        v -= tl.where(t == T - 1 - W, decay * dfl, 0.0)
    return v


@triton.jit
def _bwd_forward_sweep(dt_ptr, u_ptr, B_ptr, C_ptr, A_ptr, keep_ptr, hin_ptr, g_ptr, S_ptr, dfin_ptr, dfl_ptr,
                       w_ptr, gsh_ptr, Csh_ptr,
                       y_ptr, e_ptr, dCp_ptr, accA_ptr,
                       D, G, N, T, M, Q, rep, W, NDB,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TRUNC: tl.constexpr, RESET: tl.constexpr):
    """Recompute h; emit y (pre-gate, no D term), dC partial sums over this channel block,
    e_t = Σ_n A v_t ā_t h_{t-1} and Σ_t S_t v_t ā_t h_{t-1} (forward half of the log-decay
    telescoping)."""
    pid_b, pid_d, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, n, mask_d, mask_dn, row, grow = _offsets(pid_b, pid_d, D, G, N, T, rep, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    st = ((pid_b * D + d) * M + pid_m)[:, None] * N + n[None, :]
    h = tl.load(hin_ptr + st, mask=mask_dn, other=0.0)
    dfin = tl.load(dfin_ptr + (pid_b * D + d)[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    dfl = tl.load(dfl_ptr + (pid_b * D + d)[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    acc = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    prow = (pid_b * NDB + pid_d) * N * T + n * T
    for q in range(Q):
        t = pid_m * Q + q
        # Vector masks (the interpreter rejects scalar-bool masks): channel valid and t < T.
        md = mask_d & (d * 0 + t < T)
        mdn = mask_dn & md[:, None]
        dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
        u = tl.load(u_ptr + row + t, mask=md, other=0.0)
        g = tl.load(g_ptr + row + t, mask=md, other=0.0)
        S = tl.load(S_ptr + row + t, mask=md, other=0.0)
        Bv = tl.load(B_ptr + grow + t, mask=mdn, other=0.0)
        Cv = tl.load(C_ptr + grow + t, mask=mdn, other=0.0)
        ah = _decay(dt, A, keep_ptr, pid_b, d, t, T, md, RESET) * h  # ā_t h_{t-1}
        h = ah + (dt * u)[:, None] * Bv
        tl.store(y_ptr + row + t, tl.sum(h * Cv, axis=1), mask=md)
        tl.store(dCp_ptr + prow + t, tl.sum(tl.where(mask_dn, g[:, None] * h, 0.0), axis=0), mask=(n < N) & (n * 0 + t < T))
        v = _adjoint_input(t, row, grow, md, mdn, A, Cv, g, dfin, dfl, w_ptr, gsh_ptr, Csh_ptr, T, W, TRUNC)
        # Forward half of z_t − z_{t+1} = v_t ā_t h_{t-1} − ā_{t+1} μ_{t+1} b_t: no O(1) terms
        # cancel however fast the decay (README.md, "no cancellation").
        vah = tl.where(mdn, v * ah, 0.0)
        tl.store(e_ptr + row + t, tl.sum(vah * A, axis=1), mask=md)
        acc += S[:, None] * vah
    tl.store(accA_ptr + st, acc, mask=mask_dn)


@triton.jit
def _bwd_local_reverse(dt_ptr, C_ptr, A_ptr, keep_ptr, g_ptr, dfin_ptr, dfl_ptr, w_ptr, gsh_ptr, Csh_ptr, L_ptr,
                       D, G, N, T, M, Q, rep, W,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TRUNC: tl.constexpr, RESET: tl.constexpr):
    """Chunk-local adjoint from a zero end: L[b, d, m] = ā_{s_m} μ^loc_{s_m}."""
    pid_b, pid_d, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, n, mask_d, mask_dn, row, grow = _offsets(pid_b, pid_d, D, G, N, T, rep, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    dfin = tl.load(dfin_ptr + (pid_b * D + d)[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    dfl = tl.load(dfl_ptr + (pid_b * D + d)[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    carry = tl.zeros([BLOCK_D, BLOCK_N], dtype=A.dtype)
    for qq in range(Q):
        t = pid_m * Q + (Q - 1 - qq)
        # Vector masks (the interpreter rejects scalar-bool masks): channel valid and t < T.
        md = mask_d & (d * 0 + t < T)
        mdn = mask_dn & md[:, None]
        dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
        g = tl.load(g_ptr + row + t, mask=md, other=0.0)
        Cv = tl.load(C_ptr + grow + t, mask=mdn, other=0.0)
        v = _adjoint_input(t, row, grow, md, mdn, A, Cv, g, dfin, dfl, w_ptr, gsh_ptr, Csh_ptr, T, W, TRUNC)
        carry = _decay(dt, A, keep_ptr, pid_b, d, t, T, md, RESET) * (v + carry)
    st = ((pid_b * D + d) * M + pid_m)[:, None] * N + n[None, :]
    tl.store(L_ptr + st, carry, mask=mask_dn)


@triton.jit
def _bwd_reverse_sweep(dt_ptr, u_ptr, B_ptr, C_ptr, A_ptr, keep_ptr, nu_ptr, hend_ptr, g_ptr, S_ptr, e_ptr, dfin_ptr, dfl_ptr,
                       w_ptr, gsh_ptr, Csh_ptr,
                       du_ptr, ddt_ptr, dBp_ptr, accA_ptr,
                       D, G, N, T, M, Q, rep, W, NDB,
                       BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TRUNC: tl.constexpr, RESET: tl.constexpr):
    """True adjoint μ from the carry ν_m; emit du (state part), dΔ, dB partial sums, and
    subtract Σ_t S_t ā_{t+1} μ_{t+1} b_t (reverse half of the telescoping) from the dA partial."""
    pid_b, pid_d, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d, n, mask_d, mask_dn, row, grow = _offsets(pid_b, pid_d, D, G, N, T, rep, BLOCK_D, BLOCK_N)
    A = tl.load(A_ptr + d[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    st = ((pid_b * D + d) * M + pid_m)[:, None] * N + n[None, :]
    carry = tl.load(nu_ptr + st, mask=mask_dn, other=0.0)
    z_end = carry * tl.load(hend_ptr + st, mask=mask_dn, other=0.0)
    r = tl.sum(z_end * A, axis=1)
    dfin = tl.load(dfin_ptr + (pid_b * D + d)[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    dfl = tl.load(dfl_ptr + (pid_b * D + d)[:, None] * N + n[None, :], mask=mask_dn, other=0.0)
    S_end = tl.load(S_ptr + row + tl.minimum(pid_m * Q + Q - 1, T - 1), mask=mask_d, other=0.0)
    acc = tl.load(accA_ptr + st, mask=mask_dn, other=0.0) + S_end[:, None] * z_end
    prow = (pid_b * NDB + pid_d) * N * T + n * T
    for qq in range(Q):
        t = pid_m * Q + (Q - 1 - qq)
        # Vector masks (the interpreter rejects scalar-bool masks): channel valid and t < T.
        md = mask_d & (d * 0 + t < T)
        mdn = mask_dn & md[:, None]
        dt = tl.load(dt_ptr + row + t, mask=md, other=0.0)
        u = tl.load(u_ptr + row + t, mask=md, other=0.0)
        g = tl.load(g_ptr + row + t, mask=md, other=0.0)
        S = tl.load(S_ptr + row + t, mask=md, other=0.0)
        e = tl.load(e_ptr + row + t, mask=md, other=0.0)
        Bv = tl.load(B_ptr + grow + t, mask=mdn, other=0.0)
        Cv = tl.load(C_ptr + grow + t, mask=mdn, other=0.0)
        v = _adjoint_input(t, row, grow, md, mdn, A, Cv, g, dfin, dfl, w_ptr, gsh_ptr, Csh_ptr, T, W, TRUNC)
        # Reverse half: the carry entering t from the right (ā_{t+1} μ_{t+1}) times b_t.
        cb = tl.where(mask_dn, carry * (dt * u)[:, None] * Bv, 0.0)
        mu = tl.where(mask_dn, v + carry, 0.0)
        r = r + e - tl.sum(cb * A, axis=1)
        muB = tl.sum(mu * Bv, axis=1)
        tl.store(ddt_ptr + row + t, r + muB * u, mask=md)
        tl.store(du_ptr + row + t, muB * dt, mask=md)
        tl.store(dBp_ptr + prow + t, tl.sum(mu * (dt * u)[:, None], axis=0), mask=(n < N) & (n * 0 + t < T))
        acc -= S[:, None] * cb
        carry = _decay(dt, A, keep_ptr, pid_b, d, t, T, md, RESET) * mu
    tl.store(accA_ptr + st, acc, mask=mask_dn)


def _block_d(dim: int, rep: int) -> int:
    # A channel block must stay inside one group (rep channels), so it divides rep.
    b = 1
    while b < 16 and rep % (2 * b) == 0:
        b *= 2
    return min(b, triton.next_power_of_2(dim))


class _Prep:
    """Float-converted, contiguous operands and launch geometry shared by fwd and bwd."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk_size, seq_idx=None):
        dims = validate(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx)
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
        self.dims = dims
        self.cdt = cdt = compute_dtype(u, A, D, delta_bias, h0)
        self.Q = chunk_size
        self.M = math.ceil(dims.seqlen / chunk_size)
        self.rep = dims.dim // dims.groups
        self.BLOCK_D = _block_d(dims.dim, self.rep)
        self.BLOCK_N = triton.next_power_of_2(dims.dstate)
        self.NDB = triton.cdiv(dims.dim, self.BLOCK_D)
        self.grid = (dims.batch, self.NDB, self.M)
        self.u = u.to(cdt).contiguous()
        self.x = delta.to(cdt) if delta_bias is None else delta.to(cdt) + delta_bias.to(cdt)[:, None]
        self.dt = (F.softplus(self.x) if delta_softplus else self.x).contiguous()
        self.A = A.to(cdt).contiguous()
        self.B = as_grouped(B).to(cdt).contiguous()
        self.C = as_grouped(C).to(cdt).contiguous()
        self.h0 = None if h0 is None else h0.to(cdt).contiguous()
        # keep_t [B, T]: 0 where a document starts; the kernels read it only with RESET (a
        # dummy pointer, never dereferenced, otherwise).
        self.seq_idx = seq_idx
        self.RESET = seq_idx is not None
        self.keep = (~resets(seq_idx, 0, dims.seqlen)).to(cdt).contiguous() if self.RESET else self.dt

    def sizes(self):
        d = self.dims
        return d.dim, d.groups, d.dstate, d.seqlen, self.M, self.Q, self.rep

    def chunk_decay(self):
        """Π ā over each chunk, ``[B, D, M, N]``: ``exp(A · ΣΔ)`` times the product of the
        chunk's ``keep`` (0 if a document starts in it)."""
        decay = torch.exp(_chunk_sums(self)[..., None] * self.A[None, :, None, :])
        if self.RESET:
            d = self.dims
            keep = F.pad(self.keep, (0, self.M * self.Q - d.seqlen), value=1.0).view(d.batch, 1, self.M, self.Q).prod(-1)
            decay = decay * keep[..., None]
        return decay

    def entering_states(self, boundary):
        first = torch.zeros_like(boundary[:, :, :1]) if self.h0 is None else self.h0[:, :, None]
        return torch.cat([first, boundary[:, :, :-1]], dim=2).contiguous()

    def group_sum(self, partial):
        """[B, NDB, N, T] per-block partials → [B, G, N, T]."""
        d = self.dims
        return partial.view(d.batch, d.groups, self.NDB // d.groups, d.dstate, d.seqlen).sum(2)


def selective_scan_triton_fwd(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False, h0=None, chunk_size=256,
                              seq_idx=None):
    """Triton forward; same contract as :func:`chunked.selective_scan_chunked_fwd`."""
    p = _Prep(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk_size, seq_idx)
    d = p.dims
    hloc = torch.empty(d.batch, d.dim, p.M, d.dstate, dtype=p.cdt, device=u.device)
    _fwd_local[p.grid](p.dt, p.u, p.B, p.A, p.keep, hloc, *p.sizes(), BLOCK_D=p.BLOCK_D, BLOCK_N=p.BLOCK_N, RESET=p.RESET)
    decay = p.chunk_decay()
    # H_m = decay_m H_{m-1} + hloc_m in ~2·√M torch steps (a chunk size of 1 makes M = T).
    boundary = chunk_scan(decay, hloc, p.h0)
    y = torch.empty_like(p.u)
    _fwd_out[p.grid](p.dt, p.u, p.B, p.C, p.A, p.keep, p.entering_states(boundary), y, *p.sizes(),
                     BLOCK_D=p.BLOCK_D, BLOCK_N=p.BLOCK_N, RESET=p.RESET)
    if D is not None:
        y = y + D.to(p.cdt)[:, None] * p.u
    if z is not None:
        y = y * F.silu(z.to(p.cdt))
    return y.to(u.dtype), boundary[:, :, -1].clone(), boundary


def _chunk_sums(p: _Prep) -> torch.Tensor:
    """Σ Δ over each chunk, ``[B, D, M]`` (padding contributes 0)."""
    pad = p.M * p.Q - p.dims.seqlen
    return F.pad(p.dt, (0, pad)).view(p.dims.batch, p.dims.dim, p.M, p.Q).sum(-1)


def selective_scan_triton_bwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, boundary_states, dy, dfinal=None, chunk_size=256, mode="exact", window=None,
                              seq_idx=None):
    """Triton backward; same contract as :func:`chunked.selective_scan_chunked_bwd`."""
    p = _Prep(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk_size, seq_idx)
    d = p.dims
    if mode not in MODES:
        raise ValueError(f"selective_scan: mode must be one of {MODES}, got {mode!r}")
    if mode == "truncated" and (window is None or int(window) < 1):
        raise ValueError("selective_scan: mode='truncated' needs window >= 1")
    truncated = mode == "truncated" and int(window) < d.seqlen
    W = int(window) if truncated else 0
    T, Q, M = d.seqlen, p.Q, p.M
    cdt = p.cdt
    dyc = dy.to(cdt)
    g = (dyc * F.silu(z.to(cdt)) if z is not None else dyc).contiguous()
    pad = M * Q - T
    # Chunk-local cumulative Δ (the telescoping weights), [B, D, T].
    S = F.pad(p.dt, (0, pad)).view(d.batch, d.dim, M, Q).cumsum(-1).reshape(d.batch, d.dim, M * Q)[..., :T].contiguous()
    dfin = torch.zeros(d.batch, d.dim, d.dstate, dtype=cdt, device=u.device) if dfinal is None else dfinal.to(cdt).contiguous()
    if truncated:
        cs = F.pad(p.dt.to(torch.float64).cumsum(-1), (1, 0))
        w = torch.zeros_like(p.dt)
        w[..., : T - W] = (cs[..., W + 1 : T + 1] - cs[..., 1 : T - W + 1]).to(cdt)
        gsh = torch.zeros_like(g)
        gsh[..., : T - W] = g[..., W:]
        Csh = torch.zeros_like(p.C)
        Csh[..., : T - W] = p.C[..., W:]
        dfl = dfin
        if p.RESET:
            # A window (t, t+W] that a document starts in has decay 0: nothing leaves it.
            seg = segments(seq_idx)
            gsh[..., : T - W] *= (seg[:, W:] == seg[:, : T - W]).to(cdt)[:, None]
            dfl = dfin * (seg[:, T - 1] == seg[:, T - 1 - W]).to(cdt)[:, None, None]
    else:
        w, gsh, Csh, dfl = p.dt, g, p.C, dfin  # unused by the kernels when TRUNC is False
    boundary = boundary_states.to(cdt).contiguous()
    hin = p.entering_states(boundary)
    kw = dict(BLOCK_D=p.BLOCK_D, BLOCK_N=p.BLOCK_N, TRUNC=truncated, RESET=p.RESET)
    D_, G_, N_, T_, M_, Q_, rep = p.sizes()

    y_ssm = torch.empty_like(p.u)
    e = torch.empty_like(p.u)
    dCp = torch.empty(d.batch, p.NDB, d.dstate, T, dtype=cdt, device=u.device)
    accA = torch.empty(d.batch, d.dim, M, d.dstate, dtype=cdt, device=u.device)
    _bwd_forward_sweep[p.grid](p.dt, p.u, p.B, p.C, p.A, p.keep, hin, g, S, dfin, dfl, w, gsh, Csh,
                               y_ssm, e, dCp, accA, D_, G_, N_, T_, M_, Q_, rep, W, p.NDB, **kw)
    L = torch.empty_like(accA)
    _bwd_local_reverse[p.grid](p.dt, p.C, p.A, p.keep, g, dfin, dfl, w, gsh, Csh, L, D_, G_, N_, T_, M_, Q_, rep, W, **kw)
    decay = p.chunk_decay()
    # R_m = L_m + decay_m R_{m+1} (R_M = 0): ν_m = R_{m+1} enters chunk m from the right, dh0 = R_0.
    R = chunk_scan(decay, L, reverse=True)
    nu = torch.cat([R[:, :, 1:], torch.zeros_like(R[:, :, :1])], dim=2).contiguous()
    dh0 = R[:, :, 0]
    du = torch.empty_like(p.u)
    ddt = torch.empty_like(p.u)
    dBp = torch.empty_like(dCp)
    _bwd_reverse_sweep[p.grid](p.dt, p.u, p.B, p.C, p.A, p.keep, nu, boundary, g, S, e, dfin, dfl, w, gsh, Csh,
                               du, ddt, dBp, accA, D_, G_, N_, T_, M_, Q_, rep, W, p.NDB, **kw)
    dA = accA.sum((0, 2))
    dB, dC = p.group_sum(dBp), p.group_sum(dCp)
    if not d.grouped_b:
        dB = dB[:, 0]
    if not d.grouped_c:
        dC = dC[:, 0]
    y_pre = y_ssm
    dD = None
    if D is not None:
        du = du + D.to(cdt)[:, None] * g
        y_pre = y_pre + D.to(cdt)[:, None] * p.u
        dD = (g * p.u).sum((0, 2)).to(D.dtype)
    dz = None
    if z is not None:
        zc = z.to(cdt)
        s = torch.sigmoid(zc)
        dz = (dyc * y_pre * s * (1 + zc * (1 - s))).to(z.dtype)
    dx = ddt * torch.where(p.x > 20, torch.ones_like(p.x), torch.sigmoid(p.x)) if delta_softplus else ddt
    ddb = None if delta_bias is None else dx.sum((0, 2)).to(delta_bias.dtype)
    return (
        du.to(u.dtype), dx.to(delta.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        dD, dz, ddb, None if h0 is None else dh0.to(h0.dtype),
    )
