"""Chunked (adjoint-sharded) SSD scan in plain torch: the CPU path of the op.

Time is cut into ``M = ⌈T/Q⌉`` chunks of ``Q`` steps (the tail is padded with identity
steps ``Δ = 0``: ``a = 1``, no input). Inside a chunk the scan is the SSD matmul form
(README.md): with ``c_i`` the chunk-local cumulative log-decay and ``H_in`` the state
entering the chunk,

    y_i   = Σ_{j ≤ i} L_ij (C_i · B_j) Δ_j x_j + e^{c_i} m_i · H_in C_i,   L_ij = e^{c_i − c_j} s_ij
    H_out = e^{c_e} m_e H_in + Σ_j e^{c_e − c_j} s_ej Δ_j x_j ⊗ B_j

(``s_ij`` = 1 when no reset lies in ``(j, i]``, ``m_i`` = 1 when none lies in ``[start, i]``).
Chunks are linked by the length-M recurrence ``H_out = P · H_in + H_local`` with the scalar
``P = e^{c_e} m_e`` per (batch, head, chunk). The forward keeps only the chunk-end states
``[B, H, M, P, N]``; the backward recomputes each chunk from its saved entering state and
carries the state adjoint ``ν = ∂L/∂H_out`` across chunks right to left (the reverse of the
same recurrence), which makes it exact.

**Sub-chunks.** The matmul form is computed on sub-chunks of at most :data:`SUB_CHUNK` steps:
a chunk of Q steps is ``S = ⌈Q / SUB_CHUNK⌉`` sub-chunks of ``q = ⌈Q / S⌉`` (its last one
padded with ``S·q − Q < S`` identity steps, so a prime Q costs a few padded steps, not
1-step sub-chunks). The equations above hold for any cut of time, so the sub-chunks are the
chunks of the matmul form and only the ``[q, q]`` matrices are made; what is saved stays one
state per chunk of Q. The backward recomputes the entering states of a chunk's sub-chunks
from its saved entering state (their local states and one scan of S steps per chunk).

**Groups.** Chunks are processed ``K`` at a time (a contiguous token range, ``K·Q ≈``
:data:`GROUP_TOKENS`): left to right in the forward, right to left in the backward, each group
handed the state (forward) or adjoint (backward) at its edge by its neighbour. A group's
``[B, H, K·S, q, q]`` decay and score matrices are the largest temporaries: working memory is
bounded by the group, independent of T.
"""

from __future__ import annotations

import math

import torch

from ..selective_scan.chunked import chunk_scan
from ._args import (
    SSDDims, check_backward_args, check_chunk, compute_dtype, effective_dt, epilogue, epilogue_backward, gate_cotangent, limits,
    reduce_skip_grad, resets, skip_weight, validate,
)

__all__ = ["ssd_chunked_fwd", "ssd_chunked_bwd", "GROUP_TOKENS", "SUB_CHUNK"]

#: Default group size in tokens: a group holds ``K = max(1, GROUP_TOKENS // Q)`` chunks, so
#: its ``[B, H, K·S, q, q]`` matrices hold about ``B·H·max(GROUP_TOKENS, Q)·q`` numbers, while
#: small chunks are still batched into calls of useful size.
GROUP_TOKENS = 256

#: Most steps of a sub-chunk, the unit of the ``[q, q]`` matrices (the Triton path's kernel
#: chunk): a chunk's ``Q²`` matrix entries become ``Q·q``.
SUB_CHUNK = 64


def _sub_chunks(chunk: int) -> tuple[int, int]:
    """``(S, q)``: a chunk of Q steps is computed as S sub-chunks of ``q ≤ SUB_CHUNK`` steps,
    ``S·q − Q < S`` identity steps padding the last."""
    S = -(-chunk // SUB_CHUNK)
    return S, -(-chunk // S)


def _pad(s: torch.Tensor, dim: int, pad: int, fill_last: bool) -> torch.Tensor:
    """``s`` extended by ``pad`` entries along ``dim``: zeros, or copies of its last entry."""
    if not pad:
        return s
    shape = (*s.shape[:dim], pad, *s.shape[dim + 1:])
    tail = s.narrow(dim, -1, 1).expand(shape) if fill_last else s.new_zeros(shape)
    return torch.cat([s, tail], dim)


def _shift_in(first: torch.Tensor, ends: torch.Tensor, dim: int) -> torch.Tensor:
    """Entering states from end states along ``dim``: ``first`` (no ``dim``), then ``ends``
    without its last entry."""
    return torch.cat([first.unsqueeze(dim), ends.narrow(dim, 0, ends.shape[dim] - 1)], dim)


def _groups(seqlen: int, chunk: int, per_group: int) -> list[tuple[int, int, int, int]]:
    """``(c0, c1, t0, t1)`` of every group: chunks ``[c0, c1)``, tokens ``[t0, t1)``."""
    nchunks = math.ceil(seqlen / chunk)
    return [(c0, min(c0 + per_group, nchunks), c0 * chunk, min((c0 + per_group) * chunk, seqlen))
            for c0 in range(0, nchunks, per_group)]


def _per_group(chunk: int, group_chunks: int | None) -> int:
    if group_chunks is None:
        return max(1, GROUP_TOKENS // chunk)
    if not isinstance(group_chunks, int) or isinstance(group_chunks, bool) or group_chunks < 1:
        raise ValueError(f"ssd_scan: group_chunks must be a positive int or None, got {group_chunks!r}")
    return group_chunks


class _Group:
    """One group of chunks: its tokens in sub-chunk layout and its decay structure.

    Layouts (``K`` chunks of ``Q`` steps, each ``S`` sub-chunks of ``q`` steps; heads split as
    ``H = G·R`` so that the per-group ``C·B`` scores are computed once for the ``R`` heads
    sharing them): head tensors ``[B, G, R, K·S, q, P]``, step scalars ``[B, G, R, K·S, q]``,
    group tensors ``[B, G, K·S, q, N]``, states ``[B, G, R, K·S, P, N]``, the ``[q, q]``
    matrices ``[B, G, R, K·S, q, q]``.
    """

    def __init__(self, dims: SSDDims, Q: int, t0: int, t1: int, *, dt, A, B, C, dt_bias, softplus, lo, hi, seg, cdt):
        self.dims, self.Q, self.t0, self.t1 = dims, Q, t0, t1
        self.n = t1 - t0
        self.K = math.ceil(self.n / Q)
        self.S, self.q = _sub_chunks(Q)
        self.cdt = cdt
        G, R = dims.groups, dims.rep
        # Δ and dΔ/d dt, padded with Δ = 0 (identity steps) past the end.
        delta, self.ddelta_ddt = effective_dt(dt[:, t0:t1].to(cdt), dt_bias, softplus, lo, hi)
        self.delta = self.heads(delta)
        self.A = A.to(cdt).view(1, G, R, 1, 1)
        c = (self.delta * self.A).cumsum(-1)  # sub-chunk-local cumulative log-decay c_i
        self.Bc, self.Cc = self.grouped(B[:, t0:t1]), self.grouped(C[:, t0:t1])
        tri = torch.ones(self.q, self.q, dtype=torch.bool, device=dt.device).tril()
        if seg is None:
            same, m_in, m_end = tri, None, None
        else:
            s = self.chunks(seg[:, t0:t1], fill_last=True)  # [B, K·S, q]
            # Segment of the step before each sub-chunk: the previous one's last (padding
            # repeats its chunk's last token), token t0 − 1's for the first (token 0's, 0, at t0 = 0).
            before = torch.cat([seg[:, max(t0 - 1, 0), None], s[:, :-1, -1]], dim=1)  # [B, K·S]
            same = (tri & (s[..., :, None] == s[..., None, :]))[:, None, None]  # [B, 1, 1, K·S, q, q]
            m_in = (s == before[..., None])[:, None, None]  # H_in reaches position i
            m_end = (s == s[..., -1:])[:, None, None]  # position j reaches H_out
        # L_ij = exp(c_i − c_j) where j ≤ i in one segment: masked before the exp, never inf.
        diff = c[..., :, None] - c[..., None, :]
        self.L = torch.where(same, diff, diff.new_tensor(-math.inf)).exp_()
        self.decay_in = c.exp()  # e^{c_i} m_i
        self.decay_out = (c[..., -1:] - c).exp_()  # e^{c_e − c_j} s_ej
        if m_in is not None:
            self.decay_in = self.decay_in * m_in
            self.decay_out = self.decay_out * m_end
        self.P = self.decay_in[..., -1]  # sub-chunk decay e^{c_e} m_e, [B, G, R, K·S]
        self.CB = torch.einsum("bgkin,bgkjn->bgkij", self.Cc, self.Bc)  # [B, G, K·S, q, q]
        self.Kmat = self.L * self.CB[:, :, None]  # L ∘ (C Bᵀ), per head

    def chunks(self, s: torch.Tensor, dtype=None, fill_last: bool = False) -> torch.Tensor:
        """The group's tokens ``[B, n, ...]`` → ``[B, K·S, q, ...]``: padded to K chunks of Q
        steps, each chunk to S·q, with zeros (identity steps) or the last value."""
        if dtype is not None:
            s = s.to(dtype)
        s = _pad(s, 1, self.K * self.Q - self.n, fill_last).unflatten(1, (self.K, self.Q))
        s = _pad(s, 2, self.S * self.q - self.Q, fill_last)
        return s.reshape(s.shape[0], self.K * self.S, self.q, *s.shape[3:])

    def unchunk(self, v: torch.Tensor) -> torch.Tensor:
        """``[B, X, K·S, q, ...]`` → the group's tokens ``[B, n, X, ...]`` (padding dropped)."""
        v = v.flatten(2, 3).unflatten(2, (self.K, self.S * self.q))[:, :, :, : self.Q]
        return v.movedim(1, 3).flatten(1, 2)[:, : self.n]

    def heads(self, s: torch.Tensor) -> torch.Tensor:
        """The group's tokens ``[B, n, H(, P)]`` → ``[B, G, R, K·S, q(, P)]`` in the compute dtype."""
        return self.chunks(s, self.cdt).movedim(3, 1).unflatten(1, (self.dims.groups, self.dims.rep))

    def grouped(self, s: torch.Tensor) -> torch.Tensor:
        """The group's tokens ``[B, n, G, N]`` → ``[B, G, K·S, q, N]`` in the compute dtype."""
        return self.chunks(s, self.cdt).movedim(3, 1)

    def seq(self, v: torch.Tensor) -> torch.Tensor:
        """Head layout ``[B, G, R, K·S, q(, P)]`` → the group's tokens ``[B, n, H(, P)]``."""
        return self.unchunk(v.flatten(1, 2))

    def seq_grouped(self, v: torch.Tensor) -> torch.Tensor:
        """Group layout ``[B, G, K·S, q, N]`` → the group's tokens ``[B, n, G, N]``."""
        return self.unchunk(v)

    def local_states(self, xd: torch.Tensor) -> torch.Tensor:
        """Sub-chunk end states from a zero start, ``Σ_j e^{c_e − c_j} s_ej (Δ_j x_j) ⊗ B_j``: ``[B, G, R, K·S, P, N]``."""
        return torch.einsum("bgrkq,bgrkqp,bgkqn->bgrkpn", self.decay_out, xd, self.Bc)

    def entering_states(self, xd: torch.Tensor, chunk_in: torch.Tensor) -> torch.Tensor:
        """Every sub-chunk's entering state ``[B, G, R, K·S, P, N]`` from its chunk's saved
        entering state ``chunk_in [B, G, R, K, P, N]``: the S sub-chunks of each chunk
        re-scanned from it (the chunks are independent, so one batched scan of S steps)."""
        if self.S == 1:
            return chunk_in
        def split(v: torch.Tensor) -> torch.Tensor:  # sub-chunk axis K·S → (K, S)
            return v.unflatten(3, (self.K, self.S))

        ends = _link(split(self.P), split(self.local_states(xd)), chunk_in)
        return _shift_in(chunk_in, ends, 4).flatten(3, 4)

    def outputs(self, xd: torch.Tensor, H_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, Cᵀ H_in)``: the SSM output ``[B, G, R, K·S, q, P]`` (before D and the gate) and
        the entering state read by every position (``y``'s state term before its decay)."""
        read = torch.einsum("bgkqn,bgrkpn->bgrkqp", self.Cc, H_in)
        y = torch.einsum("bgrkij,bgrkjp->bgrkip", self.Kmat, xd) + self.decay_in[..., None] * read
        return y, read


def _link(decay: torch.Tensor, local: torch.Tensor, init: torch.Tensor, *, reverse: bool = False) -> torch.Tensor:
    """The length-L recurrence over (sub-)chunks, ``local [..., L, P, N]`` in, the same shape
    out, with scalar decays ``[..., L]``: forward ``H_k = decay_k H_{k-1} + local_k`` from
    ``H_{-1} = init``; reverse ``H_k = local_k + decay_k H_{k+1}`` from ``H_L = init``
    (``init: [..., P, N]``)."""
    *_, length, p, n = local.shape
    flat = local.reshape(1, -1, length, p * n)
    out = chunk_scan(decay.reshape(1, -1, length, 1).expand_as(flat), flat, init.reshape(1, -1, p * n), reverse=reverse)
    return out.view(local.shape)


def _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, chunk_size, group_chunks):
    dims = validate(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    Q = check_chunk(chunk_size)
    K = _per_group(Q, group_chunks)
    lo, hi = limits(dt_limit)
    cdt = compute_dtype(x, A, D, dt_bias, initial_states)
    seg = resets(seq_idx, dims.batch, dims.seqlen, x.device)

    def group(t0: int, t1: int) -> _Group:
        return _Group(dims, Q, t0, t1, dt=dt, A=A, B=B, C=C, dt_bias=None if dt_bias is None else dt_bias.to(cdt),
                      softplus=dt_softplus, lo=lo, hi=hi, seg=seg, cdt=cdt)

    return dims, Q, K, cdt, group


def ssd_chunked_fwd(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
    initial_states=None, seq_idx=None, chunk_size=256, group_chunks=None,
):
    """Chunked forward. Shapes and semantics as :func:`ssd_reference`.

    Returns:
        ``(y, final_states, boundary_states)``: ``y [B, T, H, P]`` in x's dtype,
        ``final_states [B, H, P, N]`` and ``boundary_states [B, H, M, P, N]`` (the state after
        the last step of every chunk, ``M = ⌈T/Q⌉``; the last one is the final state) in the
        compute dtype.
    """
    dims, Q, K, cdt, group = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, chunk_size, group_chunks)
    bsz, G, R, P, N = dims.batch, dims.groups, dims.rep, dims.headdim, dims.dstate
    M = math.ceil(dims.seqlen / Q)
    Dc = skip_weight(D, cdt)
    out = torch.empty_like(x)
    boundary = x.new_empty((bsz, G, R, M, P, N), dtype=cdt)
    state = x.new_zeros((bsz, G, R, P, N), dtype=cdt) if initial_states is None else initial_states.to(cdt).view(bsz, G, R, P, N)
    for c0, c1, t0, t1 in _groups(dims.seqlen, Q, K):
        grp = group(t0, t1)
        xd = grp.delta[..., None] * grp.heads(x[:, t0:t1])  # Δ_j x_j
        H_end = _link(grp.P, grp.local_states(xd), state)  # every sub-chunk's end state
        y, _ = grp.outputs(xd, _shift_in(state, H_end, 3))
        del xd
        out[:, t0:t1] = epilogue(grp.seq(y), x[:, t0:t1].to(cdt), Dc, None if z is None else z[:, t0:t1].to(cdt))
        boundary[:, :, :, c0:c1] = H_end[:, :, :, grp.S - 1 :: grp.S]  # the chunks' last sub-chunks
        state = H_end[:, :, :, -1]
    boundary = boundary.flatten(1, 2)
    return out, boundary[:, :, -1].clone(), boundary


def ssd_chunked_bwd(
    x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False, dt_limit=None,
    initial_states=None, seq_idx=None, *, boundary_states, dout, dfinal=None, chunk_size=256, group_chunks=None,
):
    """Chunked backward (exact). Groups right to left; each chunk recomputed from its saved
    entering state; the state adjoint ν carried across chunk boundaries (README.md).

    Args:
        boundary_states: ``[B, H, M, P, N]`` from :func:`ssd_chunked_fwd`.
        dout: ``[B, T, H, P]`` cotangent of the output; dfinal: optional ``[B, H, P, N]``
            cotangent of the final state.

    Returns:
        ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states)``, each in its input's dtype
        and shape; None for omitted optional inputs.
    """
    dims, Q, K, cdt, group = _prepare(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_limit, initial_states, seq_idx, chunk_size, group_chunks)
    bsz, T, H, G, R, P, N = dims.batch, dims.seqlen, dims.heads, dims.groups, dims.rep, dims.headdim, dims.dstate
    M = math.ceil(T / Q)
    check_backward_args(dims, Q, boundary_states, dout, dfinal)
    Dc = skip_weight(D, cdt)
    saved = boundary_states.to(cdt).view(bsz, G, R, M, P, N)
    init = x.new_zeros((bsz, G, R, P, N), dtype=cdt) if initial_states is None else initial_states.to(cdt).view(bsz, G, R, P, N)

    # Outputs in the inputs' dtypes, every group writes its token range; parameter gradients
    # accumulate in the compute dtype.
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    dB, dC = torch.empty_like(B), torch.empty_like(C)
    dz = None if z is None else torch.empty_like(z)
    dA = x.new_zeros((G, R), dtype=cdt)
    dD = None if D is None else x.new_zeros((H, P), dtype=cdt)
    ddt_bias = None if dt_bias is None else x.new_zeros((H,), dtype=cdt)
    # ν entering the last chunk's end state from the right: the final-state cotangent (the
    # padded tail is identity steps, so the last chunk's end state *is* the final state).
    nu_right = x.new_zeros((bsz, G, R, P, N), dtype=cdt) if dfinal is None else dfinal.to(cdt).view(bsz, G, R, P, N)
    q = _sub_chunks(Q)[1]
    strict = torch.ones(q, q, dtype=torch.bool, device=x.device).tril(-1)  # j < k

    for c0, c1, t0, t1 in reversed(_groups(T, Q, K)):
        grp = group(t0, t1)
        xs, dos = x[:, t0:t1].to(cdt), dout[:, t0:t1].to(cdt)
        zs = None if z is None else z[:, t0:t1].to(cdt)
        # g = ∂L/∂y (the output before the gate), in sequence layout for the local gradients.
        g_seq = gate_cotangent(dos, zs)
        g, xh = grp.heads(g_seq), grp.heads(xs)
        xd = grp.delta[..., None] * xh
        chunk_in = _shift_in(init if c0 == 0 else saved[:, :, :, c0 - 1], saved[:, :, :, c0:c1], 3)
        H_in = grp.entering_states(xd, chunk_in)
        del chunk_in

        # State adjoint: ∂L/∂H_in of sub-chunk k is the part its outputs read (Σ_i e^{c_i} m_i g_i ⊗ C_i)
        # plus P_k ν_k, ν_k = ∂L/∂H_out of sub-chunk k — the reverse recurrence over the sub-chunks.
        read_adj = torch.einsum("bgrkq,bgrkqp,bgkqn->bgrkpn", grp.decay_in, g, grp.Cc)
        dH_in = _link(grp.P, read_adj, nu_right, reverse=True)
        nu = torch.cat([dH_in[:, :, :, 1:], nu_right[:, :, :, None]], dim=3)
        nu_right = dH_in[:, :, :, 0]
        del read_adj, dH_in

        # Intra-chunk pairs (i, j ≤ i): y_i ∋ K_ij Δ_j x_j with K = L ∘ C Bᵀ.
        dK = torch.einsum("bgrkip,bgrkjp->bgrkij", g, xd)  # g_i · Δ_j x_j
        dCB = (dK * grp.L).sum(2)  # C Bᵀ is shared by the R heads of a group
        pairs = dK.mul_(grp.Kmat)  # contribution of pair (i, j) to the loss: M_ij
        dCc = torch.einsum("bgkij,bgkjn->bgkin", dCB, grp.Bc)
        dBc = torch.einsum("bgkij,bgkin->bgkjn", dCB, grp.Cc)
        del dCB
        # Entering state → outputs (y_i ∋ e^{c_i} m_i H_in C_i).
        y, read = grp.outputs(xd, H_in)
        dCc += torch.einsum("bgrkq,bgrkqp,bgrkpn->bgkqn", grp.decay_in, g, H_in)
        m_in = grp.decay_in * (g * read).sum(-1)
        del read
        # Inputs → end state, read by ν (H_out ∋ e^{c_e − c_j} s_ej Δ_j x_j ⊗ B_j).
        nuB = torch.einsum("bgkjn,bgrkpn->bgrkjp", grp.Bc, nu)  # ν B_j
        dxd = torch.einsum("bgrkij,bgrkip->bgrkjp", grp.Kmat, g) + grp.decay_out[..., None] * nuB
        dBc += torch.einsum("bgrkq,bgrkqp,bgrkpn->bgkqn", grp.decay_out, xd, nu)
        m_out = grp.decay_out * (xd * nuB).sum(-1)
        del nuB
        m_io = grp.P * (nu * H_in).sum((-1, -2))  # H_in → H_out, read by ν
        del H_in, nu

        # ∂L/∂(log a_k) is the sum over every path that passes step k: pairs j < k ≤ i, the
        # entering state to outputs i ≥ k, inputs j < k to the end state, and H_in to H_out.
        # Each term carries the decay of step k itself, so nothing O(1) cancels (README.md).
        from_right = pairs.flip(-2).cumsum(-2).flip(-2)  # row k: Σ_{i ≥ k} M_ij
        dlog = (from_right * strict).sum(-1)
        del pairs, from_right
        dlog += m_in.flip(-1).cumsum(-1).flip(-1)
        # Exclusive sum Σ_{j<k}, not (inclusive − m_out_k): m_out_e carries no decay (O(1)).
        dlog[..., 1:] += m_out[..., :-1].cumsum(-1)
        dlog += m_io[..., None]
        ddelta = (dxd * xh).sum(-1) + grp.A * dlog  # Δ enters Δ_j x_j and log a_j = Δ_j A
        dA += (grp.delta * dlog).sum((0, 3, 4))
        del dlog

        dB[:, t0:t1] = grp.seq_grouped(dBc)
        dC[:, t0:t1] = grp.seq_grouped(dCc)
        ddt_seq = grp.seq(ddelta) * grp.ddelta_ddt
        ddt[:, t0:t1] = ddt_seq
        if ddt_bias is not None:
            ddt_bias += ddt_seq.sum((0, 1))
        dx_seq = grp.seq(grp.delta[..., None] * dxd)
        dx_skip, dD_g, dz_g = epilogue_backward(grp.seq(y), xs, dos, g_seq, Dc, zs)
        dx[:, t0:t1] = dx_seq if dx_skip is None else dx_seq + dx_skip
        if dD is not None:
            dD += dD_g
        if dz is not None:
            dz[:, t0:t1] = dz_g

    return (
        dx,
        ddt,
        dA.reshape(H).to(A.dtype),
        dB,
        dC,
        None if D is None else reduce_skip_grad(dD, D),
        dz,
        None if dt_bias is None else ddt_bias.to(dt_bias.dtype),
        None if initial_states is None else nu_right.reshape(bsz, H, P, N).to(initial_states.dtype),
    )
