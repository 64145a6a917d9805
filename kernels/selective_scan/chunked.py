"""Chunked (adjoint-sharded) selective scan in plain torch: the CPU path of the op.

Time is cut into ``M = ⌈T/Q⌉`` chunks of length ``Q`` (the tail is padded with ``Δ = 0``,
i.e. identity steps ``ā = 1, b = 0``). Every Python loop runs over the ``Q`` positions of a
chunk, processing all ``M`` chunks (and all batches/channels) at once on ``[B, D, M, N]``
tensors, or over the ``M`` chunks for the boundary scans: O(Q + M) iterations, never O(T).

Forward keeps the chunk-end states ``[B, D, M, N]`` only. Backward recomputes the states
inside every chunk from those, and needs no per-step ``[B, D, T, N]`` tensor because the
gradient of the log-decay is obtained by a telescoping sum (README.md, "log-decay
gradient")::

    z_t := μ_t ā_t h_{t-1} = Σ_{k ≥ t} (v_k h_k − μ_k b_k)   (+ the chunk-end term ν_m H_m)

whose forward-pass half (``v_k h_k``, needs ``h``) and reverse-pass half (``μ_k b_k``,
needs ``μ``) are accumulated in separate sweeps. Working memory: a handful of
``[B, D, M, N]`` tensors plus ``[B, D, T]``-sized per-position scalars.

Step tensors use a ``[Q, B, D, M]`` ("position-major") layout so that the slice a loop
iteration reads is contiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._args import as_grouped, compute_dtype, effective_delta, validate

__all__ = ["selective_scan_chunked_fwd", "selective_scan_chunked_bwd", "MODES"]

#: Gradient modes: ``"exact"`` (the true gradient) and ``"truncated"`` (the paper's windowed
#: adjoint, an approximation that must be asked for by name).
MODES = ("exact", "truncated")


class _Layout:
    """Reshapes between sequence layout and the chunked, position-major step layout."""

    def __init__(self, bsz: int, dim: int, seqlen: int, dstate: int, groups: int, chunk: int):
        self.bsz, self.dim, self.seqlen, self.dstate, self.groups = bsz, dim, seqlen, dstate, groups
        self.Q = chunk
        self.M = math.ceil(seqlen / chunk)
        self.pad = self.M * chunk - seqlen
        self.rep = dim // groups

    def steps(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D, T]`` → ``[Q, B, D, M]`` (zero-padded)."""
        x = F.pad(x, (0, self.pad)).view(x.shape[0], x.shape[1], self.M, self.Q)
        return x.permute(3, 0, 1, 2).contiguous()

    def steps_bc(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, G, N, T]`` → ``[Q, B, G, M, N]`` (zero-padded)."""
        x = F.pad(x, (0, self.pad)).view(self.bsz, self.groups, self.dstate, self.M, self.Q)
        return x.permute(4, 0, 1, 3, 2).contiguous()

    def unsteps(self, x: torch.Tensor) -> torch.Tensor:
        """``[Q, B, D, M]`` → ``[B, D, T]``."""
        return x.permute(1, 2, 3, 0).reshape(x.shape[1], x.shape[2], self.M * self.Q)[..., : self.seqlen]

    def unsteps_bc(self, x: torch.Tensor) -> torch.Tensor:
        """``[Q, B, G, M, N]`` → ``[B, G, N, T]``."""
        x = x.permute(1, 2, 4, 3, 0).reshape(self.bsz, self.groups, self.dstate, self.M * self.Q)
        return x[..., : self.seqlen]

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Group values ``[B, G, M, N]`` → something broadcastable to ``[B, D, M, N]``."""
        if self.groups == 1 or self.rep == 1:
            # G = 1 broadcasts over D as is; G = D is already per channel: no copy.
            return x
        return x[:, :, None].expand(self.bsz, self.groups, self.rep, self.M, self.dstate).reshape(self.bsz, self.dim, self.M, self.dstate)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel ``[B, D, M, N]`` → per-group sums ``[B, G, M, N]``."""
        return x.view(self.bsz, self.groups, self.rep, self.M, self.dstate).sum(2)

    def position(self, t: int) -> tuple[int, int]:
        """Global time ``t`` → (chunk m, in-chunk position q)."""
        return t // self.Q, t % self.Q


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _boundary_inputs(h0: torch.Tensor | None, boundary: torch.Tensor) -> torch.Tensor:
    """States entering each chunk ``[B, D, M, N]``: h0 for chunk 0, chunk m-1's end state after."""
    first = torch.zeros_like(boundary[:, :, :1]) if h0 is None else h0[:, :, None]
    return torch.cat([first, boundary[:, :, :-1]], dim=2)


def selective_scan_chunked_fwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    h0: torch.Tensor | None = None,
    chunk_size: int = 256,
):
    """Chunked forward. Shapes as :func:`selective_scan_reference`.

    Returns:
        ``(y, final_state, boundary_states)``: ``y [B, D, T]`` in u's dtype,
        ``final_state [B, D, N]`` and ``boundary_states [B, D, M, N]`` (the state after the
        last step of every chunk, ``M = ⌈T/Q⌉``; ``boundary_states[:, :, -1] == final_state``)
        in the compute dtype.
    """
    dims = validate(u, delta, A, B, C, D, z, delta_bias, h0)
    lay = _Layout(dims.batch, dims.dim, dims.seqlen, dims.dstate, dims.groups, _check_chunk(chunk_size))
    cdt = compute_dtype(u, A, D, delta_bias, h0)
    uc = u.to(cdt)
    dt = effective_delta(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus)
    Ar = A.to(cdt).view(1, dims.dim, 1, dims.dstate)
    dtQ = lay.steps(dt)
    duQ = dtQ * lay.steps(uc)
    BQ = lay.steps_bc(as_grouped(B).to(cdt))
    CQ = lay.steps_bc(as_grouped(C).to(cdt))
    h0c = None if h0 is None else h0.to(cdt)

    # Sweep 1: chunk-local states from zero, all chunks at once; only the chunk ends are kept.
    h = torch.zeros(dims.batch, dims.dim, lay.M, dims.dstate, dtype=cdt, device=u.device)
    for q in range(lay.Q):
        h = torch.exp(dtQ[q][..., None] * Ar) * h + duQ[q][..., None] * lay.expand(BQ[q])
    # Whole-chunk decay Π ā = exp(A · ΣΔ): one exp of a sum, no division anywhere; it
    # underflows to 0 for long strongly-decaying chunks, which is the right value.
    chunk_decay = torch.exp(dtQ.sum(0)[..., None] * Ar)
    # Length-M boundary scan: H_m = P_m · H_{m-1} + h_local_m.
    boundary = torch.empty_like(h)
    carry = torch.zeros_like(h[:, :, 0]) if h0c is None else h0c
    for m in range(lay.M):
        carry = chunk_decay[:, :, m] * carry + h[:, :, m]
        boundary[:, :, m] = carry
    # Sweep 2: true states from each chunk's entering state; emit y.
    h = _boundary_inputs(h0c, boundary)
    yQ = torch.empty_like(dtQ)
    for q in range(lay.Q):
        h = torch.exp(dtQ[q][..., None] * Ar) * h + duQ[q][..., None] * lay.expand(BQ[q])
        yQ[q] = (h * lay.expand(CQ[q])).sum(-1)
    y = lay.unsteps(yQ)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    return y.to(u.dtype), boundary[:, :, -1].clone(), boundary


def _softplus_grad(x: torch.Tensor) -> torch.Tensor:
    # d softplus / dx with torch's default threshold (softplus(x) = x for x > 20), so the
    # gradient matches autograd through F.softplus exactly.
    return torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x))


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def selective_scan_chunked_bwd(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    h0: torch.Tensor | None,
    boundary_states: torch.Tensor,
    dy: torch.Tensor,
    dfinal: torch.Tensor | None = None,
    chunk_size: int = 256,
    mode: str = "exact",
    window: int | None = None,
):
    """Chunked adjoint backward.

    Args:
        u … h0: the forward's inputs (shapes as :func:`selective_scan_reference`).
        boundary_states: ``[B, D, M, N]`` from :func:`selective_scan_chunked_fwd` with the
            same ``chunk_size``.
        dy: ``[B, D, T]`` cotangent of y.
        dfinal: optional ``[B, D, N]`` cotangent of the final state.
        mode: ``"exact"`` or ``"truncated"`` (windowed adjoint with ``window`` = T̄ ≥ 1:
            the gradients flowing through the state — u, delta, delta_bias, A, B, h0 —
            keep only contributions of outputs at most ``window - 1`` steps later; C, D, z
            gradients are local and stay exact; see README.md).

    Returns:
        ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0)``, each in its input's dtype and
        shape; the entries for omitted optional inputs are None.
    """
    dims = validate(u, delta, A, B, C, D, z, delta_bias, h0)
    lay = _Layout(dims.batch, dims.dim, dims.seqlen, dims.dstate, dims.groups, _check_chunk(chunk_size))
    if mode not in MODES:
        raise ValueError(f"selective_scan: mode must be one of {MODES}, got {mode!r}")
    if mode == "truncated" and (window is None or int(window) < 1):
        raise ValueError("selective_scan: mode='truncated' needs window >= 1 (the number of output steps kept)")
    want = (dims.batch, dims.dim, lay.M, dims.dstate)
    if tuple(boundary_states.shape) != want:
        raise ValueError(f"selective_scan: boundary_states must be {want} for chunk_size={lay.Q}, got {tuple(boundary_states.shape)}")
    if dy.shape != u.shape:
        raise ValueError(f"selective_scan: dy must have y's shape {tuple(u.shape)}, got {tuple(dy.shape)}")
    if dfinal is not None and tuple(dfinal.shape) != (dims.batch, dims.dim, dims.dstate):
        raise ValueError(f"selective_scan: dfinal must be {(dims.batch, dims.dim, dims.dstate)}, got {tuple(dfinal.shape)}")
    # A window that reaches past the end keeps every contribution: the truncated gradient
    # *is* the exact one, so take the exact path.
    truncated = mode == "truncated" and int(window) < dims.seqlen
    W = int(window) if truncated else 0

    # The log-decay gradient is a telescoping sum over a chunk, whose round-off grows like
    # eps · Q / (decay horizon) for fast-decaying states (README.md, "numerics"). On the CPU
    # the backward therefore works in float64 whatever the input dtype: more precise than
    # plain PyTorch in float32 at about twice the arithmetic cost.
    cdt = torch.float64 if u.device.type == "cpu" else compute_dtype(u, A, D, delta_bias, h0)
    T, Q, M = dims.seqlen, lay.Q, lay.M
    uc = u.to(cdt)
    x = delta.to(cdt) if delta_bias is None else delta.to(cdt) + delta_bias.to(cdt)[:, None]
    dt = F.softplus(x) if delta_softplus else x
    A_c = A.to(cdt)
    Ar = A_c.view(1, dims.dim, 1, dims.dstate)
    dyc = dy.to(cdt)
    # g = ∂L/∂(y before the gate).
    g = dyc * F.silu(z.to(cdt)) if z is not None else dyc
    dtQ, uQ, gQ = lay.steps(dt), lay.steps(uc), lay.steps(g)
    duQ_in = dtQ * uQ
    BQ = lay.steps_bc(as_grouped(B).to(cdt))
    CQ = lay.steps_bc(as_grouped(C).to(cdt))
    # Chunk-local cumulative Δ, S_q = Σ_{j ≤ q in chunk} Δ_j: weights of the log-decay
    # gradient telescoping (bounded by one chunk, so no long-range cancellation).
    SQ = dtQ.cumsum(0)
    boundary = boundary_states.to(cdt)
    H_in = _boundary_inputs(None if h0 is None else h0.to(cdt), boundary)
    dfc = None if dfinal is None else dfinal.to(cdt)
    m_last, q_last = lay.position(T - 1)

    if truncated:
        # Leaving term of the windowed adjoint at t: Π_{j=t+1}^{t+W} ā_j · C_{t+W} g_{t+W}.
        # Window sums of Δ come from a float64 prefix sum: the difference of two prefix sums
        # loses at most ~1e-16 · ΣΔ absolute, so the product exp(A · window sum) is safe
        # (and it is a product of decays, never a division by one).
        cs = F.pad(dt.to(torch.float64).cumsum(-1), (1, 0))
        wsum = torch.zeros_like(dt)
        wsum[..., : T - W] = (cs[..., W + 1 : T + 1] - cs[..., 1 : T - W + 1]).to(cdt)
        g_sh = torch.zeros_like(g)
        g_sh[..., : T - W] = g[..., W:]
        C_sh = torch.zeros_like(as_grouped(C), dtype=cdt)
        C_sh[..., : T - W] = as_grouped(C).to(cdt)[..., W:]
        wQ, gshQ, CshQ = lay.steps(wsum), lay.steps(g_sh), lay.steps_bc(C_sh)
        t_leave = T - 1 - W  # where the final-state cotangent leaves the window
        m_leave, q_leave = lay.position(t_leave) if t_leave >= 0 else (-1, -1)

    def adjoint_input(q: int) -> torch.Tensor:
        """v at in-chunk position q for all chunks, ``[B, D, M, N]``: μ_t = v_t + ā_{t+1} μ_{t+1}."""
        v = lay.expand(CQ[q]) * gQ[q][..., None]
        if truncated:
            v = v - torch.exp(wQ[q][..., None] * Ar) * lay.expand(CshQ[q]) * gshQ[q][..., None]
        if dfc is not None:
            # The final-state cotangent is an output attached to h_{T-1}.
            # v is a fresh product here, so the in-place update touches nothing shared.
            if q == q_last:
                v[:, :, m_last] += dfc
            if truncated and q == q_leave:
                v[:, :, m_leave] -= torch.exp(wsum[:, :, t_leave, None] * A_c) * dfc
        return v

    def step_terms(q: int):
        a = torch.exp(dtQ[q][..., None] * Ar)
        Bq = lay.expand(BQ[q])
        return a, Bq, duQ_in[q][..., None] * Bq

    # Sweep F (forward): recompute true states; emit y (for dz), dC, and the forward half of
    # the log-decay telescoping: e_q = Σ_n A v h (per position) and Σ_q S_q v h (for dA).
    h = H_in
    yQ = torch.empty_like(dtQ)
    eQ = torch.empty_like(dtQ)
    dCQ = torch.empty_like(CQ)
    acc_dA = torch.zeros_like(h)
    for q in range(Q):
        a, Bq, b = step_terms(q)
        h = a * h + b
        yQ[q] = (h * lay.expand(CQ[q])).sum(-1)
        dCQ[q] = lay.reduce(gQ[q][..., None] * h)
        vh = adjoint_input(q) * h
        eQ[q] = (vh * Ar).sum(-1)
        acc_dA += SQ[q][..., None] * vh

    # Sweep L (reverse, chunk-local adjoint from zero): L_m = ā_{s_m} μ^loc_{s_m}.
    carry = torch.zeros_like(h)
    for q in reversed(range(Q)):
        a, _, _ = step_terms(q)
        carry = a * (adjoint_input(q) + carry)
    chunk_decay = torch.exp(SQ[-1][..., None] * Ar)
    # Length-M reverse scan: ν_{M-1} = 0 (the final-state cotangent is injected at T-1),
    # ν_{m-1} = L_m + P_m ν_m; dh0 = ν_{-1}.
    nu = torch.empty_like(carry)
    nxt = torch.zeros_like(carry[:, :, 0])
    for m in reversed(range(M)):
        nu[:, :, m] = nxt
        nxt = carry[:, :, m] + chunk_decay[:, :, m] * nxt
    dh0 = nxt

    # Sweep R (reverse, true adjoint): μ from ν_m; emit du, dΔ, dB and the reverse half of the
    # telescoping. r = Σ_n A_n z_{q,n}, started at the chunk end with z = ν_m ⊙ H_m.
    z_end = nu * boundary
    r = (z_end * Ar).sum(-1)
    carry = nu
    duQ = torch.empty_like(dtQ)
    ddtQ = torch.empty_like(dtQ)
    dBQ = torch.empty_like(BQ)
    for q in reversed(range(Q)):
        a, Bq, b = step_terms(q)
        mu = adjoint_input(q) + carry
        mub = mu * b
        r = r + eQ[q] - (mub * Ar).sum(-1)
        muB = (mu * Bq).sum(-1)
        ddtQ[q] = r + muB * uQ[q]
        duQ[q] = muB * dtQ[q]
        dBQ[q] = lay.reduce(mu * duQ_in[q][..., None])
        acc_dA -= SQ[q][..., None] * mub
        carry = a * mu
    acc_dA += SQ[-1][..., None] * z_end
    dA = acc_dA.sum((0, 2))

    du = lay.unsteps(duQ)
    ddt = lay.unsteps(ddtQ)
    y_pre = lay.unsteps(yQ)
    dD = None
    if D is not None:
        du = du + D.to(cdt)[:, None] * g
        y_pre = y_pre + D.to(cdt)[:, None] * uc
        dD = (g * uc).sum((0, 2)).to(D.dtype)
    dz = None if z is None else (dyc * y_pre * _silu_grad(z.to(cdt))).to(z.dtype)
    dx = ddt * _softplus_grad(x) if delta_softplus else ddt
    ddelta_bias = None if delta_bias is None else dx.sum((0, 2)).to(delta_bias.dtype)
    dB = lay.unsteps_bc(dBQ)
    dC = lay.unsteps_bc(dCQ)
    if not dims.grouped_b:
        dB = dB[:, 0]
    if not dims.grouped_c:
        dC = dC[:, 0]
    return (
        du.to(u.dtype),
        dx.to(delta.dtype),
        dA.to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        dD,
        dz,
        ddelta_bias,
        None if h0 is None else dh0.to(h0.dtype),
    )
