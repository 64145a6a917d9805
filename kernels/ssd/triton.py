"""Triton kernels for the chunked SSD scan (the CUDA path of the op).

One program per (chunk m, head h, batch b) for the chunk kernels, each holding its chunk's
``[Q, P]`` / ``[Q, N]`` tiles and the ``[Q, Q]`` decay and score matrices of the SSD matmul
form (README.md); the state passing between chunks is a sequential loop over the chunks,
one program per (b, h, block of the P·N state entries). The kernels' chunks are at most
:data:`KERNEL_CHUNK` steps: a longer ``chunk_size`` is cut into kernel chunks, and only the
states at its boundaries are saved (README.md, "CUDA path"). The schedule is the one of
``chunked.py``:

* forward: ``_chunk_state`` (chunk-local end states from zero) → ``_state_passing`` (chunk-end
  states ``H_m = P_m H_{m-1} + local_m``) → ``_chunk_output`` (y from each chunk's entering state).
* backward: ``_chunk_state_adjoint`` (what each chunk's outputs read from its entering state)
  → ``_state_passing`` in reverse (the state adjoint ν entering every chunk from the right,
  and the initial-state gradient) → ``_chunk_backward`` (every gradient of the chunk: its
  outputs recomputed from the saved entering state).

Sums over the heads of a group (dB, dC) and over batch and time (dA, dD, dt_bias) are written
as per-head / per-token partials and summed in torch: deterministic, no atomics. Δ, its
chunk-local cumulative log-decay and the segment numbers of ``seq_idx`` are ``[B, T, H]`` /
``[B, T]`` scalars made in torch. Everything runs in the compute dtype (float32 for 16-bit
and float32 inputs, float64 for float64); ``tl.dot`` runs in IEEE precision (no TF32).
Tested on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._args import (
    check_backward_args, check_chunk, compute_dtype, effective_dt, epilogue, epilogue_backward, gate_cotangent,
    limits, reduce_skip_grad, resets, skip_weight, validate,
)

__all__ = ["ssd_triton_fwd", "ssd_triton_bwd"]


@triton.jit
def _chunk_setup(pid_b, pid_h, pid_m, delta_ptr, cum_ptr, seg_ptr, T, H, Q,
                 HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr):
    """Token indices of chunk m and its decay structure, for the chunk kernels.

    Returns ``t`` (token of each row), ``valid`` (t < T and inside the chunk), Δ, the
    decay ``[Q, Q]`` matrix ``L_ij = e^{c_i − c_j} s_ij`` (j ≤ i, one segment), ``decay_in_i =
    e^{c_i} m_i`` (entering state → position i), ``decay_out_j = e^{c_e − c_j} s_ej``
    (position j → end state) and the chunk decay ``e^{c_e} m_e``.
    """
    q = tl.arange(0, BLOCK_Q)
    t = pid_m * Q + q
    valid = (q < Q) & (t < T)
    row = (pid_b * T + t).to(tl.int64) * H + pid_h
    delta = tl.load(delta_ptr + row, mask=valid, other=0.0)
    c = tl.load(cum_ptr + row, mask=valid, other=0.0)
    t_end = tl.minimum(pid_m * Q + Q - 1, T - 1)
    # A chunk wholly past the end (the padding of the last saved chunk) is identity steps.
    c_end = tl.where(pid_m * Q < T, tl.load(cum_ptr + (pid_b * T + t_end).to(tl.int64) * H + pid_h), 0.0)
    i_ge_j = (q[:, None] >= q[None, :]) & valid[:, None] & valid[None, :]
    if HAS_SEQ:
        seg = tl.load(seg_ptr + pid_b * T + t, mask=valid, other=0)
        seg_end = tl.load(seg_ptr + pid_b * T + t_end)
        # Segment of the token before the chunk (token 0's, 0, for the first chunk).
        seg_before = tl.load(seg_ptr + pid_b * T + tl.minimum(tl.maximum(pid_m * Q - 1, 0), T - 1))
        same = i_ge_j & (seg[:, None] == seg[None, :])
        reach_in = valid & (seg == seg_before)
        reach_out = valid & (seg == seg_end)
        chunk_decay = tl.where(seg_end == seg_before, tl.exp(c_end), 0.0)
    else:
        same = i_ge_j
        reach_in = valid
        reach_out = valid
        chunk_decay = tl.exp(c_end)
    # Masked before the exp: e^{c_i − c_j} for i < j could overflow.
    L = tl.exp(tl.where(same, c[:, None] - c[None, :], float("-inf")))
    decay_in = tl.where(reach_in, tl.exp(c), 0.0)
    decay_out = tl.where(reach_out, tl.exp(tl.where(reach_out, c_end - c, 0.0)), 0.0)
    return t, valid, delta, L, decay_in, decay_out, chunk_decay


@triton.jit
def _load_rows(ptr, t, valid, T, width, stride_t, offset, cols, mask_cols, pid_b):
    """A ``[BLOCK_Q, BLOCK_cols]`` tile of rows t of a ``[B, T, ..., width]`` tensor (row stride stride_t)."""
    base = (pid_b * T + t).to(tl.int64) * stride_t + offset
    return tl.load(ptr + base[:, None] + cols[None, :], mask=valid[:, None] & mask_cols[None, :], other=0.0)


@triton.jit
def _state_ptrs(pid_b, pid_h, pid_m, H, M, P, N, p, n):
    return (((pid_b * H + pid_h) * M + pid_m).to(tl.int64) * P + p[:, None]) * N + n[None, :]


@triton.jit
def _chunk_state(x_ptr, B_ptr, delta_ptr, cum_ptr, seg_ptr, local_ptr, decay_ptr,
                 T, H, G, P, N, M, Q, R,
                 HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunk end state from a zero start, ``Σ_j decay_out_j Δ_j x_j ⊗ B_j`` → local[b, h, m],
    and the chunk decay → decay[b, h, m]."""
    pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, valid, delta, L, decay_in, decay_out, chunk_decay = _chunk_setup(
        pid_b, pid_h, pid_m, delta_ptr, cum_ptr, seg_ptr, T, H, Q, HAS_SEQ, BLOCK_Q)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    x = _load_rows(x_ptr, t, valid, T, P, H * P, pid_h * P, p, p < P, pid_b)
    Bv = _load_rows(B_ptr, t, valid, T, N, G * N, (pid_h // R) * N, n, n < N, pid_b)
    xw = x * (decay_out * delta)[:, None]
    state = tl.dot(tl.trans(xw), Bv, input_precision="ieee")
    tl.store(local_ptr + _state_ptrs(pid_b, pid_h, pid_m, H, M, P, N, p, n), state, mask=(p < P)[:, None] & (n < N)[None, :])
    tl.store(decay_ptr + (pid_b * H + pid_h) * M + pid_m, chunk_decay)


@triton.jit
def _state_passing(local_ptr, decay_ptr, init_ptr, out_ptr, M, PN,
                   REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    """The recurrence across chunks for one (b, h) and a block of P·N state entries:
    forward ``out_m = decay_m out_{m-1} + local_m`` from ``out_{-1} = init``; reverse
    ``out_m = local_m + decay_m out_{m+1}`` from ``out_M = init``."""
    pid_bh, pid_e = tl.program_id(0), tl.program_id(1)
    e = pid_e * BLOCK + tl.arange(0, BLOCK)
    mask = e < PN
    carry = tl.load(init_ptr + pid_bh.to(tl.int64) * PN + e, mask=mask, other=0.0)
    for k in range(M):
        m = M - 1 - k if REVERSE else k
        off = (pid_bh.to(tl.int64) * M + m) * PN + e
        decay = tl.load(decay_ptr + pid_bh * M + m)
        carry = decay * carry + tl.load(local_ptr + off, mask=mask, other=0.0)
        tl.store(out_ptr + off, carry, mask=mask)


@triton.jit
def _chunk_output(x_ptr, B_ptr, C_ptr, delta_ptr, cum_ptr, seg_ptr, hin_ptr, y_ptr,
                  T, H, G, P, N, M, Q, R,
                  HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """``y_i = Σ_j L_ij (C_i·B_j) Δ_j x_j + decay_in_i H_in C_i`` (before D and the gate)."""
    pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, valid, delta, L, decay_in, decay_out, chunk_decay = _chunk_setup(
        pid_b, pid_h, pid_m, delta_ptr, cum_ptr, seg_ptr, T, H, Q, HAS_SEQ, BLOCK_Q)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    x = _load_rows(x_ptr, t, valid, T, P, H * P, pid_h * P, p, p < P, pid_b)
    Bv = _load_rows(B_ptr, t, valid, T, N, G * N, (pid_h // R) * N, n, n < N, pid_b)
    Cv = _load_rows(C_ptr, t, valid, T, N, G * N, (pid_h // R) * N, n, n < N, pid_b)
    hin = tl.load(hin_ptr + _state_ptrs(pid_b, pid_h, pid_m, H, M, P, N, p, n), mask=(p < P)[:, None] & (n < N)[None, :], other=0.0)
    scores = L * tl.dot(Cv, tl.trans(Bv), input_precision="ieee")
    y = tl.dot(scores, x * delta[:, None], input_precision="ieee")
    y += decay_in[:, None] * tl.dot(Cv, tl.trans(hin), input_precision="ieee")
    base = (pid_b * T + t).to(tl.int64) * (H * P) + pid_h * P
    tl.store(y_ptr + base[:, None] + p[None, :], y, mask=valid[:, None] & (p < P)[None, :])


@triton.jit
def _chunk_state_adjoint(g_ptr, C_ptr, delta_ptr, cum_ptr, seg_ptr, out_ptr, decay_ptr,
                         T, H, G, P, N, M, Q, R,
                         HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """What the chunk's outputs read from its entering state, ``Σ_i decay_in_i g_i ⊗ C_i`` →
    out[b, h, m], and the chunk decay → decay[b, h, m]."""
    pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, valid, delta, L, decay_in, decay_out, chunk_decay = _chunk_setup(
        pid_b, pid_h, pid_m, delta_ptr, cum_ptr, seg_ptr, T, H, Q, HAS_SEQ, BLOCK_Q)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    g = _load_rows(g_ptr, t, valid, T, P, H * P, pid_h * P, p, p < P, pid_b)
    Cv = _load_rows(C_ptr, t, valid, T, N, G * N, (pid_h // R) * N, n, n < N, pid_b)
    adj = tl.dot(tl.trans(g * decay_in[:, None]), Cv, input_precision="ieee")
    tl.store(out_ptr + _state_ptrs(pid_b, pid_h, pid_m, H, M, P, N, p, n), adj, mask=(p < P)[:, None] & (n < N)[None, :])
    tl.store(decay_ptr + (pid_b * H + pid_h) * M + pid_m, chunk_decay)


@triton.jit
def _chunk_backward(x_ptr, B_ptr, C_ptr, delta_ptr, cum_ptr, seg_ptr, hin_ptr, nu_ptr, g_ptr,
                    y_ptr, dx_ptr, dBh_ptr, dCh_ptr, ddelta_ptr, dlog_ptr, A_ptr,
                    T, H, G, P, N, M, Q, R,
                    HAS_SEQ: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Every gradient of chunk m from its entering state H_in and the adjoint ν of its end state:
    y (for dz), dx (state part), per-head dB and dC, dΔ and ∂L/∂(log a) (README.md)."""
    pid_m, pid_h, pid_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t, valid, delta, L, decay_in, decay_out, chunk_decay = _chunk_setup(
        pid_b, pid_h, pid_m, delta_ptr, cum_ptr, seg_ptr, T, H, Q, HAS_SEQ, BLOCK_Q)
    q = tl.arange(0, BLOCK_Q)
    p, n = tl.arange(0, BLOCK_P), tl.arange(0, BLOCK_N)
    mask_pn = (p < P)[:, None] & (n < N)[None, :]
    x = _load_rows(x_ptr, t, valid, T, P, H * P, pid_h * P, p, p < P, pid_b)
    g = _load_rows(g_ptr, t, valid, T, P, H * P, pid_h * P, p, p < P, pid_b)
    Bv = _load_rows(B_ptr, t, valid, T, N, G * N, (pid_h // R) * N, n, n < N, pid_b)
    Cv = _load_rows(C_ptr, t, valid, T, N, G * N, (pid_h // R) * N, n, n < N, pid_b)
    sp = _state_ptrs(pid_b, pid_h, pid_m, H, M, P, N, p, n)
    hin = tl.load(hin_ptr + sp, mask=mask_pn, other=0.0)
    nu = tl.load(nu_ptr + sp, mask=mask_pn, other=0.0)
    xd = x * delta[:, None]

    # Intra-chunk pairs (i, j ≤ i): y_i ∋ K_ij Δ_j x_j, K = L ∘ C Bᵀ.
    Kmat = L * tl.dot(Cv, tl.trans(Bv), input_precision="ieee")
    dK = tl.dot(g, tl.trans(xd), input_precision="ieee")  # g_i · Δ_j x_j
    dCB = dK * L
    pairs = dK * Kmat  # the loss's share of pair (i, j)
    dC = tl.dot(dCB, Bv, input_precision="ieee")
    dB = tl.dot(tl.trans(dCB), Cv, input_precision="ieee")
    # Entering state → outputs.
    read = tl.dot(Cv, tl.trans(hin), input_precision="ieee")  # H_in C_i, [Q, P]
    y = tl.dot(Kmat, xd, input_precision="ieee") + decay_in[:, None] * read
    dC += decay_in[:, None] * tl.dot(g, hin, input_precision="ieee")
    m_in = decay_in * tl.sum(g * read, axis=1)
    # Inputs → end state, read by ν.
    nuB = tl.dot(Bv, tl.trans(nu), input_precision="ieee")  # ν B_j, [Q, P]
    dxd = tl.dot(tl.trans(Kmat), g, input_precision="ieee") + decay_out[:, None] * nuB
    dB += (decay_out * delta)[:, None] * tl.dot(x, nu, input_precision="ieee")
    m_out = decay_out * delta * tl.sum(x * nuB, axis=1)
    m_io = chunk_decay * tl.sum(tl.sum(nu * hin, axis=1), axis=0)

    # ∂L/∂(log a_k): pairs j < k ≤ i, entering state to outputs i ≥ k, inputs j < k to the end
    # state, entering to end state. W[k, j] = Σ_{i ≥ k} pairs[i, j] as one matmul with the
    # upper-triangular ones matrix.
    k_le_i = (q[:, None] <= q[None, :]).to(pairs.dtype)
    W = tl.dot(k_le_i, pairs, input_precision="ieee")
    dlog = tl.sum(tl.where(q[None, :] < q[:, None], W, 0.0), axis=1)
    dlog += tl.sum(tl.where(q[None, :] >= q[:, None], m_in[None, :], 0.0), axis=1)
    dlog += tl.sum(tl.where(q[None, :] < q[:, None], m_out[None, :], 0.0), axis=1)
    dlog += m_io
    A = tl.load(A_ptr + pid_h)
    ddelta = tl.sum(dxd * x, axis=1) + A * dlog

    row = (pid_b * T + t).to(tl.int64) * H + pid_h
    mask_qp = valid[:, None] & (p < P)[None, :]
    mask_qn = valid[:, None] & (n < N)[None, :]
    tl.store(y_ptr + row[:, None] * P + p[None, :], y, mask=mask_qp)
    tl.store(dx_ptr + row[:, None] * P + p[None, :], delta[:, None] * dxd, mask=mask_qp)
    tl.store(dBh_ptr + row[:, None] * N + n[None, :], dB, mask=mask_qn)
    tl.store(dCh_ptr + row[:, None] * N + n[None, :], dC, mask=mask_qn)
    tl.store(ddelta_ptr + row, ddelta, mask=valid)
    tl.store(dlog_ptr + row, dlog, mask=valid)


#: Longest chunk the kernels work on: their ``[Q, Q]`` tiles must fit a program's registers
#: and shared memory. A larger ``chunk_size`` Q is cut into ``S = Q / Q_k`` kernel chunks of
#: ``Q_k`` = the largest divisor of Q not above this; the saved states stay at Q's boundaries
#: (the backward recomputes the states inside a saved chunk from its entering state).
KERNEL_CHUNK = 64


def _kernel_chunk(chunk: int) -> int:
    return max(d for d in range(1, min(chunk, KERNEL_CHUNK) + 1) if chunk % d == 0)


class _Prep:
    """Operands in the compute dtype (contiguous), Δ, the kernel-chunk-local cumulative
    log-decay, the segment numbers and the launch geometry shared by forward and backward.

    ``M = ⌈T/Q⌉`` saved chunks of ``Q = chunk_size`` steps, each cut into ``S`` kernel chunks
    of ``Qk`` steps: the kernels run over ``M·S`` kernel chunks (those wholly past T are
    identity steps).
    """

    def __init__(self, x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, chunk_size):
        self.dims = d = validate(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
        Q = check_chunk(chunk_size)
        self.cdt = cdt = compute_dtype(x, A, D, dt_bias, initial_states)
        self.M = M = math.ceil(d.seqlen / Q)
        self.Qk = Qk = _kernel_chunk(Q)
        self.S = Q // Qk
        self.Mk = Mk = M * self.S
        lo, hi = limits(dt_limit)
        self.delta, self.ddelta_ddt = effective_dt(dt.to(cdt), None if dt_bias is None else dt_bias.to(cdt), dt_softplus, lo, hi)
        self.delta = self.delta.contiguous()
        self.A = A.to(cdt).contiguous()
        # c_t = Σ Δ A from the kernel chunk's start to t (inclusive), [B, T, H].
        pad = M * Q - d.seqlen
        la = F.pad(self.delta * self.A, (0, 0, 0, pad)).view(d.batch, Mk, Qk, d.heads)
        self.cum = la.cumsum(2).view(d.batch, M * Q, d.heads)[:, : d.seqlen].contiguous()
        self.seg = resets(seq_idx, d.batch, d.seqlen, x.device)
        self.x = x.to(cdt).contiguous()
        self.B = B.to(cdt).contiguous()
        self.C = C.to(cdt).contiguous()
        self.initial = (x.new_zeros((d.batch, d.heads, d.headdim, d.dstate), dtype=cdt) if initial_states is None
                        else initial_states.to(cdt).contiguous())
        # Chunks on grid axis 0: the only one not limited to 65535 programs.
        self.grid = (Mk, d.heads, d.batch)
        self.meta = dict(
            HAS_SEQ=self.seg is not None,
            BLOCK_Q=max(16, triton.next_power_of_2(Qk)),
            BLOCK_P=max(16, triton.next_power_of_2(d.headdim)),
            BLOCK_N=max(16, triton.next_power_of_2(d.dstate)),
        )

    def sizes(self):
        d = self.dims
        return d.seqlen, d.heads, d.groups, d.headdim, d.dstate, self.Mk, self.Qk, d.rep

    def seg_arg(self):
        # Any pointer when there are no documents: the kernels do not read it.
        return self.delta if self.seg is None else self.seg

    def states(self):
        """``[B, H, M·S, P, N]``, one state per kernel chunk."""
        d = self.dims
        return torch.empty(d.batch, d.heads, self.Mk, d.headdim, d.dstate, dtype=self.cdt, device=self.x.device)

    def decays(self):
        """``[B, H, M·S]``, one chunk decay per kernel chunk."""
        d = self.dims
        return torch.empty(d.batch, d.heads, self.Mk, dtype=self.cdt, device=self.x.device)

    def local_states(self):
        """``_chunk_state``: every kernel chunk's end state from zero and its decay."""
        local, decay = self.states(), self.decays()
        _chunk_state[self.grid](self.x, self.B, self.delta, self.cum, self.seg_arg(), local, decay, *self.sizes(), **self.meta)
        return local, decay

    def passing(self, local, decay, init, reverse: bool = False):
        """``_state_passing`` along dim 2 of ``local [B, H, L, P, N]`` (``decay [B, H, L]``) for
        each of ``init``'s leading entries: ``init [B, H, P, N]`` runs one scan over all L, ``init
        [B, H, M, P, N]`` one per saved chunk over its ``L / M`` kernel chunks."""
        d = self.dims
        seqs = init[..., 0, 0].numel()
        length = local[..., 0, 0].numel() // seqs
        pn = d.headdim * d.dstate
        out = torch.empty_like(local)
        block = min(1024, triton.next_power_of_2(pn))
        _state_passing[(seqs, triton.cdiv(pn, block))](local, decay, init.contiguous(), out, length, pn,
                                                       REVERSE=reverse, BLOCK=block)
        return out

    def entering(self, ends, init):
        """Entering states ``[B, H, L, P, N]`` of a run of chunks with end states ``ends`` along
        dim -3 that starts from ``init`` (one fewer dim)."""
        return torch.cat([init.unsqueeze(-3), ends.narrow(-3, 0, ends.shape[-3] - 1)], dim=-3)

    def kernel_entering(self, boundary):
        """Every kernel chunk's entering state ``[B, H, M·S, P, N]`` from the saved chunk-end
        states ``[B, H, M, P, N]``: inside each saved chunk, the states are recomputed from its
        entering state (its S kernel chunks' local states, one scan per saved chunk)."""
        chunk_in = self.entering(boundary, self.initial)
        if self.S == 1:
            return chunk_in.contiguous()
        d = self.dims
        local, decay = self.local_states()
        ends = self.passing(local, decay, chunk_in)
        split = (d.batch, d.heads, self.M, self.S, d.headdim, d.dstate)
        return self.entering(ends.view(split), chunk_in).reshape(d.batch, d.heads, self.Mk, d.headdim, d.dstate).contiguous()


def ssd_triton_fwd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                   initial_states=None, seq_idx=None, chunk_size=256):
    """Triton forward; same contract as :func:`chunked.ssd_chunked_fwd`."""
    p = _Prep(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, chunk_size)
    local, decay = p.local_states()
    ends = p.passing(local, decay, p.initial)  # every kernel chunk's end state
    # Saved: the ends of the Q-chunks only, the last kernel chunk of each.
    boundary = ends[:, :, p.S - 1 :: p.S].contiguous()
    y = torch.empty_like(p.x)
    _chunk_output[p.grid](p.x, p.B, p.C, p.delta, p.cum, p.seg_arg(), p.entering(ends, p.initial).contiguous(), y,
                          *p.sizes(), **p.meta)
    del ends, local
    out = epilogue(y, p.x, skip_weight(D, p.cdt), None if z is None else z.to(p.cdt))
    return out.to(x.dtype), boundary[:, :, -1].clone(), boundary


def ssd_triton_bwd(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
                   initial_states=None, seq_idx=None, *, boundary_states, dout, dfinal=None, chunk_size=256):
    """Triton backward; same contract as :func:`chunked.ssd_chunked_bwd`."""
    p = _Prep(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, chunk_size)
    d = p.dims
    check_backward_args(d, chunk_size, boundary_states, dout, dfinal)
    cdt = p.cdt
    dout_c = dout.to(cdt)
    zc = None if z is None else z.to(cdt)
    g = gate_cotangent(dout_c, zc).contiguous()
    boundary = boundary_states.to(cdt).contiguous()

    read_adj, decay = p.states(), p.decays()
    _chunk_state_adjoint[p.grid](g, p.C, p.delta, p.cum, p.seg_arg(), read_adj, decay, *p.sizes(), **p.meta)
    # R_m = ∂L/∂H_in of kernel chunk m = read_m + P_m R_{m+1}, R_{M·S} = ∂L/∂final: ν_m = R_{m+1}.
    nu_end = torch.zeros_like(p.initial) if dfinal is None else dfinal.to(cdt).contiguous()
    R = p.passing(read_adj, decay, nu_end, reverse=True)
    nu = torch.cat([R[:, :, 1:], nu_end[:, :, None]], dim=2).contiguous()
    del read_adj

    y = torch.empty_like(p.x)
    dx = torch.empty_like(p.x)
    dBh = torch.empty(d.batch, d.seqlen, d.heads, d.dstate, dtype=cdt, device=x.device)
    dCh = torch.empty_like(dBh)
    ddelta = torch.empty_like(p.delta)
    dlog = torch.empty_like(p.delta)
    _chunk_backward[p.grid](p.x, p.B, p.C, p.delta, p.cum, p.seg_arg(), p.kernel_entering(boundary), nu, g,
                            y, dx, dBh, dCh, ddelta, dlog, p.A, *p.sizes(), **p.meta)

    bsz, T, H, G, R_, N = d.batch, d.seqlen, d.heads, d.groups, d.rep, d.dstate
    dB = dBh.view(bsz, T, G, R_, N).sum(3)
    dC = dCh.view(bsz, T, G, R_, N).sum(3)
    dA = (p.delta * dlog).sum((0, 1))
    ddt = ddelta * p.ddelta_ddt
    dx_skip, dD, dz = epilogue_backward(y, p.x, dout_c, g, skip_weight(D, cdt), zc)
    if dx_skip is not None:
        dx = dx + dx_skip
    return (
        dx.to(x.dtype), ddt.to(dt.dtype), dA.to(A.dtype), dB.to(B.dtype), dC.to(C.dtype),
        None if D is None else reduce_skip_grad(dD, D),
        None if z is None else dz.to(z.dtype),
        None if dt_bias is None else ddt.sum((0, 1)).to(dt_bias.dtype),
        None if initial_states is None else R[:, :, 0].to(initial_states.dtype),
    )
