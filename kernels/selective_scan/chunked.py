"""Chunked (adjoint-sharded) selective scan in plain torch: the CPU path of the op.

Time is cut into ``M = ⌈T/Q⌉`` chunks of length ``Q`` (the tail is padded with ``Δ = 0``,
i.e. identity steps ``ā = 1, b = 0``); the forward saves the state at every chunk end
(``[B, D, M, N]``), and the backward needs no per-step ``[B, D, T, N]`` tensor because the
gradient of the log-decay is obtained by a telescoping sum (README.md, "log-decay
gradient")::

    z_t := μ_t ā_t h_{t-1} = Σ_{k ≥ t} (v_k h_k − μ_k b_k)   (+ the segment-end term ν H)

whose forward-pass half (``v_k h_k``, needs ``h``) and reverse-pass half (``μ_k b_k``,
needs ``μ``) are accumulated in separate sweeps.

**Groups.** Chunks are processed in groups of ``K`` consecutive chunks (a contiguous token
range; only the last group is padded), one group at a time: left to right in the forward,
right to left in the backward, each group visited once and handed the state (forward) or
adjoint carry (backward) at its edge by its neighbour. Every per-position quantity (Δ, its
cumulative sums, the adjoint input's scalar factor, ``e_k``, y, the gradients before the
cast, ...) exists only for the group being processed, built from slices of the inputs;
results are written into preallocated outputs by slice assignment. Working memory is
therefore O(B·D·K·Q), independent of T (what grows with T are the outputs and the
``[B, D, M, N]`` boundary states).

**Sub-chunks.** Inside a group the sweeps run over sub-chunks of ``P`` steps (``P`` divides
``Q``, ``P ≤ max(``:data:`SUB_CHUNK` ``, N)``): every Python loop runs over the ``P`` positions of a
sub-chunk, processing all ``J = K·Q/P`` sub-chunks of the group (and all batches/channels)
at once on ``[B, D, J, N]`` tensors, or over the ``J`` sub-chunks for the scans that link
them. A group's sub-chunk entering states are recomputed from the saved state at the
group's start (Sweep 1 + a forward scan), exactly as the saved chunk-boundary states
themselves are computed in the forward. Short sweeps over many sub-chunks keep each torch
call large (``B·D·J·N`` numbers) with a small group, where sweeping whole chunks of a small
group would make thousands of tiny, interpreter-bound calls. It is the same algorithm with
a finer schedule, so the gradients are the same up to float64 round-off (smaller, in fact:
the telescoping sums run over ``P`` instead of ``Q`` steps).

Step tensors use a ``[P, B, D, J]`` ("position-major") layout so that the slice a loop
iteration reads is contiguous.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._args import as_grouped, compute_dtype, resets, segments, validate

__all__ = ["selective_scan_chunked_fwd", "selective_scan_chunked_bwd", "chunk_scan", "MODES", "GROUP_TOKENS", "SUB_CHUNK"]

#: Gradient modes: ``"exact"`` (the true gradient) and ``"truncated"`` (the paper's windowed
#: adjoint, an approximation that must be asked for by name).
MODES = ("exact", "truncated")

#: Default group size in tokens: a group holds ``K = max(1, GROUP_TOKENS // Q)`` chunks.
#: Working memory of one call is about ``c · B·D·K·Q`` float64 numbers (c ≈ 10 in the
#: backward, 4 in the forward, for ``P ≥ N``; README.md, "Memory"), independent of T.
#: 256 keeps the backward's working memory at B·D = 64 near 1.2 MiB while every torch call
#: still works on ``B·D·J·N`` = 16K numbers (measured: the CPU time of a training step's
#: scan is then within a few percent of processing all chunks at once).
GROUP_TOKENS = 256

#: Longest sub-chunk (target): the sweeps inside a group run over ``P`` steps, ``P`` the
#: largest divisor of ``Q`` not above the target (``P = Q`` for ``Q ≤`` target, and also
#: when ``Q`` has no divisor in ``[target/4, target]``, e.g. a large prime: correct, slower).
#: The target is ``max(SUB_CHUNK, N)``, so that a ``[B, D, J, N]`` state tensor is no
#: larger than a ``[P, B, D, J]`` step tensor. Python loop iterations per group: about
#: ``4P + 2J`` (backward), ``2P + J`` (forward), each on ``[B, D, J, N]`` tensors with
#: ``J = K·Q/P``; about four such state tensors are alive at a time.
SUB_CHUNK = 16


class _Layout:
    """Reshapes between sequence layout and the position-major step layout of one group.

    A group covers ``ntok`` tokens starting at a chunk boundary, cut into ``J = ⌈ntok/P⌉``
    sub-chunks of ``P`` positions; the positions past ``ntok`` (only in the last group) are
    padded. Step tensors are ``[P, B, D, J]`` (scalars) and ``[P, B, G, J, N]`` (B/C).
    """

    def __init__(self, bsz: int, dim: int, ntok: int, dstate: int, groups: int, sub: int):
        self.bsz, self.dim, self.ntok, self.dstate, self.groups = bsz, dim, ntok, dstate, groups
        self.P = sub
        self.J = math.ceil(ntok / sub)
        self.pad = self.J * sub - ntok
        self.rep = dim // groups

    def steps(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[B, D, n]`` (``n ≤ J·P``) → ``[P, B, D, J]`` in ``dtype``, zero past ``n``; one copy."""
        out = x.new_empty((self.P, x.shape[0], x.shape[1], self.J), dtype=dtype or x.dtype)
        self._fill(out, x, lambda v: v.permute(3, 0, 1, 2), lambda v: v.permute(2, 0, 1))
        return out

    def steps_bc(self, x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``[B, G, N, n]`` (``n ≤ J·P``) → ``[P, B, G, J, N]`` in ``dtype``, zero past ``n``."""
        out = x.new_empty((self.P, self.bsz, self.groups, self.J, self.dstate), dtype=dtype or x.dtype)
        self._fill(out, x, lambda v: v.permute(4, 0, 1, 3, 2), lambda v: v.permute(3, 0, 1, 2))
        return out

    def _fill(self, out, x, full_view, tail_view):
        # ``out`` is [P, B, D|G, J(, N)]: the sub-chunk index is dim 3.
        n = x.shape[-1]
        full, rest = divmod(n, self.P)
        if full:
            out[:, :, :, :full].copy_(full_view(x[..., : full * self.P].unflatten(-1, (full, self.P))))
        if full < self.J:
            tail = out[:, :, :, full:]
            tail.zero_()
            if rest:
                tail[:rest, :, :, 0].copy_(tail_view(x[..., full * self.P :]))

    def write(self, out: torch.Tensor, xQ: torch.Tensor) -> None:
        """``out[B, D, ntok]`` (a slice of a sequence-layout output) ``←`` step-layout ``xQ``, cast."""
        full, rest = divmod(self.ntok, self.P)
        if full:
            out[..., : full * self.P].unflatten(-1, (full, self.P)).copy_(xQ[..., :full].permute(1, 2, 3, 0))
        if rest:
            out[..., full * self.P :].copy_(xQ[:rest, :, :, full].permute(1, 2, 0))

    def write_bc(self, out: torch.Tensor, xQ: torch.Tensor) -> None:
        """``out[B, G, N, ntok]`` ``←`` ``xQ[P, B, G, J, N]``, cast."""
        full, rest = divmod(self.ntok, self.P)
        if full:
            out[..., : full * self.P].unflatten(-1, (full, self.P)).copy_(xQ[:, :, :, :full].permute(1, 2, 4, 3, 0))
        if rest:
            out[..., full * self.P :].copy_(xQ[:rest, :, :, full].permute(1, 2, 3, 0))

    def zero_pad(self, xQ: torch.Tensor) -> torch.Tensor:
        """Zero the padded positions of a step-layout ``[P, B, D, J]`` tensor (in place)."""
        if self.pad:
            xQ[self.P - self.pad :, :, :, -1] = 0
        return xQ

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """Per-group values ``[B, G, J, N]`` → something broadcastable to ``[B, D, J, N]``."""
        if self.groups == 1 or self.rep == 1:
            # G = 1 broadcasts over D as is; G = D is already per channel: no copy.
            return x
        return x[:, :, None].expand(self.bsz, self.groups, self.rep, self.J, self.dstate).reshape(self.bsz, self.dim, self.J, self.dstate)

    def reduce_into(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Per-channel ``[B, D, J, N]`` → per-group sums written to ``out[B, G, J, N]``."""
        if self.rep == 1:
            out.copy_(x)
        elif self.groups == 1:
            torch.sum(x, 1, keepdim=True, out=out)
        else:
            torch.sum(x.view(self.bsz, self.groups, self.rep, self.J, self.dstate), 2, out=out)


def _check_chunk(chunk_size: int) -> int:
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def _group_chunks(chunk: int, group_chunks: int | None) -> int:
    """Chunks per group: ``group_chunks`` if given, else ``max(1, GROUP_TOKENS // chunk)``."""
    if group_chunks is None:
        return max(1, GROUP_TOKENS // chunk)
    if not isinstance(group_chunks, int) or isinstance(group_chunks, bool) or group_chunks < 1:
        raise ValueError(f"selective_scan: group_chunks must be a positive int or None, got {group_chunks!r}")
    return group_chunks


def _sub_chunk(chunk: int, dstate: int) -> int:
    """Sub-chunk length ``P``: see :data:`SUB_CHUNK`."""
    target = max(SUB_CHUNK, dstate)
    if chunk <= target:
        return chunk
    best = max(d for d in range(1, target + 1) if chunk % d == 0)
    return best if best >= target // 4 else chunk


def chunk_scan(decay: torch.Tensor, x: torch.Tensor, init: torch.Tensor | None = None, *, reverse: bool = False) -> torch.Tensor:
    """The length-M linear recurrence across chunks, ``[B, D, M, N]`` in and out, in about
    ``2·√M`` Python steps instead of M.

    Forward: ``H_m = decay_m ⊙ H_{m-1} + x_m`` with ``H_{-1} = init`` (zero if None); returns
    every ``H_m``. Reverse: ``R_m = x_m + decay_m ⊙ R_{m+1}`` with ``R_M = init``; returns
    every ``R_m``.

    The chunks are cut into blocks of ``S = ⌈√M⌉``: one sweep of S steps runs every block's
    local scan at once (from zero) and the running product of its decays, one sweep over the
    ``⌈M/S⌉`` blocks links them, and ``H = local + Π decay ⊙ H_entering`` fills in the rest —
    the sub-chunk scheme of the sweeps, applied to the chunk boundaries. Products only, no
    division: a decay that underflows to 0 stays the right value. A per-chunk Python loop
    would make a small chunk size (1–3 tokens: M = T) cost one interpreter round trip per
    token; this one costs ``2·√T``.
    """
    if reverse:
        flip = lambda t: t.flip(2)  # noqa: E731
        return flip(chunk_scan(flip(decay), flip(x), init))
    bsz, dim, m, n = x.shape
    if init is None:
        init = x.new_zeros((bsz, dim, n))
    if m <= 4:
        out = torch.empty_like(x)
        carry = init
        for j in range(m):
            carry = torch.addcmul(x[:, :, j], decay[:, :, j], carry)
            out[:, :, j] = carry
        return out
    size = math.isqrt(m - 1) + 1
    nb = -(-m // size)
    pad = nb * size - m
    # Padding: identity steps (decay 1, input 0) at the end.
    dec = F.pad(decay, (0, 0, 0, pad), value=1.0).view(bsz, dim, nb, size, n)
    xs = F.pad(x, (0, 0, 0, pad)).view(bsz, dim, nb, size, n)
    local = torch.empty_like(xs)
    prod = torch.empty_like(dec)
    h, p = xs[:, :, :, 0], dec[:, :, :, 0]
    local[:, :, :, 0], prod[:, :, :, 0] = h, p
    for s in range(1, size):
        h = torch.addcmul(xs[:, :, :, s], dec[:, :, :, s], h)
        p = p * dec[:, :, :, s]
        local[:, :, :, s], prod[:, :, :, s] = h, p
    entering = torch.empty((bsz, dim, nb, n), dtype=x.dtype, device=x.device)
    carry = init
    for b in range(nb):
        entering[:, :, b] = carry
        carry = torch.addcmul(local[:, :, b, -1], prod[:, :, b, -1], carry)
    out = local.addcmul_(prod, entering[:, :, :, None]).view(bsz, dim, nb * size, n)
    return out[:, :, :m].contiguous() if pad else out


#: Above this many sub-chunks in a group, the scans linking them use :func:`chunk_scan`
#: (``2·√J`` torch calls) instead of one in-place call per sub-chunk: only small chunk sizes
#: (``P = Q`` of a few tokens) give a group that many.
LINK_LOOP_MAX = 32


def _link_(x: torch.Tensor, decay: torch.Tensor, init: torch.Tensor, *, reverse: bool = False) -> None:
    """In place, ``x_j ← x_j + decay_j ⊙ x_{j∓1}`` along dim 2 from ``init`` (the scan linking a
    group's sub-chunks: their local end states, or their local adjoints in reverse)."""
    if x.shape[2] > LINK_LOOP_MAX:
        x.copy_(chunk_scan(decay, x, init, reverse=reverse))
        return
    carry = init
    idx = range(x.shape[2] - 1, -1, -1) if reverse else range(x.shape[2])
    for j in idx:
        carry = x[:, :, j].addcmul_(decay[:, :, j], carry)


def _groups(seqlen: int, chunk: int, per_group: int) -> list[tuple[int, int, int, int]]:
    """``(c0, c1, t0, t1)`` of every group: chunks ``[c0, c1)``, tokens ``[t0, t1)``."""
    nchunks = math.ceil(seqlen / chunk)
    return [(c0, min(c0 + per_group, nchunks), c0 * chunk, min((c0 + per_group) * chunk, seqlen)) for c0 in range(0, nchunks, per_group)]


def _delta_steps(lay: _Layout, delta: torch.Tensor, bias: torch.Tensor | None, softplus: bool, dtype: torch.dtype):
    """``(x, Δ)`` in step layout for a slice of ``delta``: ``x = δ + bias``, ``Δ = softplus(x)``
    (or ``x``). Padded positions get ``Δ = 0`` (identity steps); their ``x`` is meaningless."""
    x = lay.steps(delta, dtype)
    if bias is not None:
        x += bias.view(1, 1, -1, 1)
    dt = lay.zero_pad(F.softplus(x) if softplus else x)
    return x, dt


def _keep_steps(lay: _Layout, seq_idx: torch.Tensor | None, t0: int, t1: int, dtype: torch.dtype) -> torch.Tensor | None:
    """``keep_t`` for tokens ``[t0, t1)`` in step layout ``[P, B, 1, J]`` (None without
    documents): 0 where a document starts (the step's decay ``ā_t`` is multiplied by it), 1
    elsewhere and at the padded positions (identity steps stay identities)."""
    if seq_idx is None:
        return None
    # The resets, zero-padded by the layout, then keep = 1 - reset: padding keeps.
    return lay.steps(resets(seq_idx, t0, t1)[:, None].to(dtype)).neg_().add_(1)


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
    group_chunks: int | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Chunked forward. Shapes as :func:`selective_scan_reference`.

    With ``seq_idx`` every per-step decay ``ā_t`` is multiplied by ``keep_t`` (0 where a
    document starts) and every sub-chunk's decay ``Π ā`` by the product of its ``keep_t``:
    the same recurrence with some decays set to 0.

    Groups of ``group_chunks`` chunks (default ``max(1, GROUP_TOKENS // chunk_size)``) are
    processed left to right. In a group: Sweep 1 gives the sub-chunk-local end states, a
    scan over the group's sub-chunks (from the state the previous group ended with) gives
    every sub-chunk's entering state and records the chunk-end states, Sweep 2 emits y into
    the preallocated output. Working memory: a few ``[P, B, D, J]`` step tensors and
    ``[B, D, J, N]`` states of one group (``J·P`` = the group's tokens), not ``[B, D, T]``.

    Returns:
        ``(y, final_state, boundary_states)``: ``y [B, D, T]`` in u's dtype,
        ``final_state [B, D, N]`` and ``boundary_states [B, D, M, N]`` (the state after the
        last step of every chunk, ``M = ⌈T/Q⌉``; ``boundary_states[:, :, -1] == final_state``)
        in the compute dtype.
    """
    dims = validate(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx)
    Q = _check_chunk(chunk_size)
    K = _group_chunks(Q, group_chunks)
    P = _sub_chunk(Q, A.shape[-1])
    per = Q // P  # sub-chunks per chunk
    bsz, dim, T, N = dims.batch, dims.dim, dims.seqlen, dims.dstate
    M = math.ceil(T / Q)
    cdt = compute_dtype(u, A, D, delta_bias, h0)
    Ar = A.to(cdt).view(1, dim, 1, N)
    bias = None if delta_bias is None else delta_bias.to(cdt)
    Dq = None if D is None else D.to(cdt).view(1, 1, dim, 1)
    Bg, Cg = as_grouped(B), as_grouped(C)
    y = u.new_empty(u.shape)
    boundary = u.new_empty((bsz, dim, M, N), dtype=cdt)

    def group(c0: int, c1: int, t0: int, t1: int, carry: torch.Tensor) -> torch.Tensor:
        """Forward of chunks [c0, c1); ``carry`` is the state entering chunk c0. Returns the
        state after chunk c1-1. (A function, so the group's buffers die before the next's.)"""
        lay = _Layout(bsz, dim, t1 - t0, N, dims.groups, P)
        _, dtQ = _delta_steps(lay, delta[..., t0:t1], bias, delta_softplus, cdt)
        duQ = dtQ * lay.steps(u[..., t0:t1])
        BQ = lay.steps_bc(Bg[..., t0:t1], cdt)
        dt4, du4, Bs = dtQ.unsqueeze(-1).unbind(0), duQ.unsqueeze(-1).unbind(0), BQ.unbind(0)
        keepQ = _keep_steps(lay, seq_idx, t0, t1, cdt)
        keep4 = None if keepQ is None else keepQ.unsqueeze(-1).unbind(0)

        def step(q: int, h: torch.Tensor) -> torch.Tensor:
            a = (dt4[q] * Ar).exp_()
            if keep4 is not None:
                a.mul_(keep4[q])
            return a.mul_(h).addcmul_(du4[q], lay.expand(Bs[q]))

        # Sweep 1: sub-chunk-local states from zero, all sub-chunks of the group at once;
        # only their ends are kept.
        h = u.new_zeros((bsz, dim, lay.J, N), dtype=cdt)
        for q in range(P):
            h = step(q, h)
        # Whole-sub-chunk decay Π ā = exp(A · ΣΔ): one exp of a sum, no division anywhere;
        # it underflows to 0 for long strongly-decaying stretches, which is the right value.
        decay = torch.exp(dtQ.sum(0)[..., None] * Ar)
        if keepQ is not None:
            decay.mul_(keepQ.prod(0)[..., None])  # a document starting inside: Π ā = 0
        # Scan over sub-chunks: H_j = P_j · H_{j-1} + h_local_j, in place of h_local (one
        # torch call per sub-chunk). Chunk ends are sub-chunk ends (P divides Q; the last
        # sub-chunk ends the last chunk, padded or not).
        enter = carry
        _link_(h, decay, enter)
        ends = list(range(per - 1, lay.J, per))
        if not ends or ends[-1] != lay.J - 1:
            ends.append(lay.J - 1)
        boundary[:, :, c0:c1] = h[:, :, ends]
        carry = boundary[:, :, c1 - 1]
        del decay
        # Sweep 2: true states from each sub-chunk's entering state; emit y.
        h = torch.cat([enter[:, :, None], h[:, :, :-1]], dim=2)
        CQ = lay.steps_bc(Cg[..., t0:t1], cdt)
        yQ = torch.empty_like(dtQ)
        for q, (Cq, yq) in enumerate(zip(CQ.unbind(0), yQ.unbind(0))):
            h = step(q, h)
            torch.sum(h * lay.expand(Cq), -1, out=yq)
        del h, CQ, Cq, yq, dtQ, duQ, dt4, du4, Bs, BQ, keepQ, keep4
        if Dq is not None:
            yQ.addcmul_(Dq, lay.steps(u[..., t0:t1]))
        if z is not None:
            yQ.mul_(F.silu(lay.steps(z[..., t0:t1], cdt)))
        lay.write(y[..., t0:t1], yQ)
        return carry

    carry = u.new_zeros((bsz, dim, N), dtype=cdt) if h0 is None else h0.to(cdt)
    for c0, c1, t0, t1 in _groups(T, Q, K):
        carry = group(c0, c1, t0, t1, carry)
    return y, boundary[:, :, -1].clone(), boundary


def _softplus_grad_(x: torch.Tensor) -> torch.Tensor:
    # d softplus / dx with torch's default threshold (softplus(x) = x for x > 20), so the
    # gradient matches autograd through F.softplus exactly. Overwrites nothing but a fresh
    # sigmoid (the mask is 1 byte per element).
    return torch.sigmoid(x).masked_fill_(x > 20, 1.0)


def _silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    # s * (1 + z * (1 - s)), with one temporary besides s.
    return torch.rsub(s, 1).mul_(z).add_(1).mul_(s)


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
    group_chunks: int | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Chunked adjoint backward.

    Groups of ``group_chunks`` chunks (default ``max(1, GROUP_TOKENS // chunk_size)``) are
    processed right to left, each visited once, on sub-chunks of ``P`` steps: Sweep L gives
    the sub-chunk-local adjoint carries ``L_j``; Sweep 1 and a forward scan from the saved
    state entering the group give every sub-chunk's entering state; the reverse scan over
    the group's sub-chunks, continued from the group to the right, gives ν (and dh0 after
    the first group); Sweep F and Sweep R write du, ddelta, dB, dC, dz into preallocated
    outputs and accumulate dA, dD, ddelta_bias (:class:`_GroupBackward`, one method per
    sweep). Working memory: about ten ``[B, D]`` × group-tokens float64 tensors, independent
    of T. The result does not depend on the grouping beyond float64 round-off of
    re-associated sums.

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
        group_chunks: chunks per group (None: the :data:`GROUP_TOKENS` rule).
        seq_idx: optional ``[B, T]`` document index, as in the forward. The adjoint is the
            same formula with the masked decays ``keep_t ā_t`` (README.md, "Documents"); in
            truncated mode a window that contains a reset leaves nothing behind it.

    Returns:
        ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0)``, each in its input's dtype and
        shape; the entries for omitted optional inputs are None.
    """
    call = _Backward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, boundary_states, dy, dfinal,
                     chunk_size, mode, window, group_chunks, seq_idx)
    # ν after the last token is zero: the final-state cotangent is injected at T-1.
    nxt = call.du.new_zeros((call.bsz, call.dim, call.N), dtype=call.cdt)
    for c0, c1, t0, t1 in reversed(_groups(call.T, call.Q, call.K)):
        nxt = _GroupBackward(call, c0, c1, t0, t1).run(nxt)
    return call.results(dh0=nxt)


class _Backward:
    """What every group of one backward call shares: the checked sizes, the inputs, the
    parameters in the compute dtype, the preallocated outputs (each group writes its token
    range of du, ddelta, dB, dC, dz and adds to dA, dD, ddelta_bias) and, in truncated mode,
    the prefix sums of Δ."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, boundary_states, dy, dfinal,
                 chunk_size, mode, window, group_chunks, seq_idx=None):
        dims = validate(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx)
        Q = self.Q = _check_chunk(chunk_size)
        self.K = _group_chunks(Q, group_chunks)
        self.P = _sub_chunk(Q, A.shape[-1])
        if mode not in MODES:
            raise ValueError(f"selective_scan: mode must be one of {MODES}, got {mode!r}")
        if mode == "truncated" and (window is None or int(window) < 1):
            raise ValueError("selective_scan: mode='truncated' needs window >= 1 (the number of output steps kept)")
        bsz, dim, T, N = self.bsz, self.dim, self.T, self.N = dims.batch, dims.dim, dims.seqlen, dims.dstate
        self.G = dims.groups
        self.M = math.ceil(T / Q)
        want = (bsz, dim, self.M, N)
        if tuple(boundary_states.shape) != want:
            raise ValueError(f"selective_scan: boundary_states must be {want} for chunk_size={Q}, got {tuple(boundary_states.shape)}")
        if dy.shape != u.shape:
            raise ValueError(f"selective_scan: dy must have y's shape {tuple(u.shape)}, got {tuple(dy.shape)}")
        if dfinal is not None and tuple(dfinal.shape) != (bsz, dim, N):
            raise ValueError(f"selective_scan: dfinal must be {(bsz, dim, N)}, got {tuple(dfinal.shape)}")
        # A window that reaches past the end keeps every contribution: the truncated gradient
        # *is* the exact one, so take the exact path.
        self.truncated = mode == "truncated" and int(window) < T
        self.W = int(window) if self.truncated else 0

        # The log-decay gradient is a telescoping sum over a (sub-)chunk, whose round-off grows
        # like eps · P / (decay horizon) for fast-decaying states (README.md, "numerics"). On
        # the CPU the backward therefore works in float64 whatever the input dtype: more precise
        # than plain PyTorch in float32 at about twice the arithmetic cost. Raw inputs (u, dy,
        # z, B, C) are widened exactly where they are used (u stays in its dtype in the group's
        # step tensor: mixed-dtype ops promote exactly); everything derived from them is float64.
        cdt = self.cdt = torch.float64 if u.device.type == "cpu" else compute_dtype(u, A, D, delta_bias, h0)
        self.A, self.D, self.delta_bias, self.h0 = A, D, delta_bias, h0
        self.u, self.delta, self.z, self.dy, self.softplus = u, delta, z, dy, delta_softplus
        self.boundary_states = boundary_states
        self.seq_idx = seq_idx
        self.A_c = A.to(cdt)
        self.Ar = self.A_c.view(1, dim, 1, N)
        self.bias = None if delta_bias is None else delta_bias.to(cdt)
        self.Dq = None if D is None else D.to(cdt).view(1, 1, dim, 1)
        self.h0c = None if h0 is None else h0.to(cdt)
        self.dfc = None if dfinal is None else dfinal.to(cdt)
        self.Bg, self.Cg = as_grouped(B), as_grouped(C)

        # Outputs, preallocated in the inputs' dtypes; every group writes its token range.
        self.du = u.new_empty(u.shape)
        self.dx = delta.new_empty(delta.shape)
        self.dB, self.dC = B.new_empty(B.shape), C.new_empty(C.shape)
        self.dBg, self.dCg = as_grouped(self.dB), as_grouped(self.dC)
        self.dz = None if z is None else z.new_empty(z.shape)
        self.dA = self.A_c.new_zeros((dim, N))
        self.dD = None if D is None else self.A_c.new_zeros(dim)
        self.ddb = None if delta_bias is None else self.A_c.new_zeros(dim)

        if self.truncated:
            # Leaving term of the windowed adjoint at t: Π_{j=t+1}^{t+W} ā_j · C_{t+W} g_{t+W},
            # with the window sum Σ_{j=t+1}^{t+W} Δ_j = P(t+W) − P(t), P the inclusive prefix sum
            # of Δ. P is assembled as (sum of whole chunks before) + (chunk-local cumsum), both
            # float64: the difference loses at most ~1e-16 · ΣΔ absolute, so exp(A · window sum)
            # is safe (and it is a product of decays, never a division by one). Only the chunk
            # totals ([B, D, M]) are kept for all of T; a group needs P over its own range and
            # over the same range shifted by W (a group-sized slice, not the whole halo).
            totals = self.A_c.new_empty((bsz, dim, self.M))
            for c0, c1, t0, t1 in _groups(T, Q, self.K):
                totals[..., c0:c1] = self.delta_seq(t0, t1).sum(-1)
            self.chunk_prefix = F.pad(totals.cumsum(-1), (1, 0))  # [B, D, M+1]: Σ Δ before chunk c
            del totals
            # With documents the window's decay Π_{j=t+1}^{t+W} keep_j ā_j is 0 when a reset
            # lies in (t, t+W], i.e. where the segment numbers of t and t+W differ ([B, T]).
            self.segments = None if seq_idx is None else segments(seq_idx)
            self.t_leave = T - 1 - self.W  # where the final-state cotangent leaves the window (≥ 0)

    def delta_seq(self, lo: int, hi: int) -> torch.Tensor:
        """Δ over tokens [lo, hi) (lo a chunk start), ``[B, D, chunks, Q]`` zero-padded."""
        Q = self.Q
        nch = math.ceil((hi - lo) / Q)
        x = self.delta[..., lo:hi].to(self.cdt)
        if self.bias is not None:
            x = x + self.bias[:, None]
        d = F.softplus(x) if self.softplus else x
        return F.pad(d, (0, nch * Q - (hi - lo))).unflatten(-1, (nch, Q))

    def prefix(self, lo: int, n: int) -> torch.Tensor:
        """P(t) for t in [lo, lo + n) (all < T), ``[B, D, n]`` (truncated mode)."""
        Q = self.Q
        c0, c1 = lo // Q, math.ceil((lo + n) / Q)
        p = self.delta_seq(c0 * Q, min(c1 * Q, self.T)).cumsum(-1).add_(self.chunk_prefix[..., c0:c1, None])
        return p.flatten(-2)[..., lo - c0 * Q : lo - c0 * Q + n]

    def results(self, dh0: torch.Tensor) -> tuple:
        """``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0)`` in the inputs' dtypes (None for
        omitted inputs), given ``dh0``, the carry the first group hands on."""
        return (
            self.du,
            self.dx,
            self.dA.to(self.A.dtype),
            self.dB,
            self.dC,
            None if self.dD is None else self.dD.to(self.D.dtype),
            self.dz,
            None if self.ddb is None else self.ddb.to(self.delta_bias.dtype),
            None if self.h0 is None else dh0.to(self.h0.dtype),
        )


class _GroupBackward:
    """The backward of chunks [c0, c1) (tokens [t0, t1)), one sweep per method, in the order
    :meth:`run` calls them.

    Construction builds the group's step tensors (``[P, B, D, J]`` scalars, ``[P, B, G, J, N]``
    B/C; compute dtype but u): Δ, its sub-chunk sums ``S_end``, u, ``g = ∂L/∂(y before the
    gate)``, B, C and, in truncated mode, what leaves the window. The sweeps hand their
    ``[B, D, J, N]`` results on through the attributes ``H_in`` and ``nu`` (taken, not kept:
    each sweep overwrites its buffer step by step) and their per-position results through
    ``yQ``, ``dtQ`` (becomes du's state part) and ``eQ`` (becomes dΔ). A group's buffers die
    with the object, before the next group's exist.
    """

    def __init__(self, call: _Backward, c0: int, c1: int, t0: int, t1: int):
        self.call, self.c0, self.c1, self.t0, self.t1 = call, c0, c1, t0, t1
        cdt = call.cdt
        lay = self.lay = _Layout(call.bsz, call.dim, t1 - t0, call.N, call.G, call.P)
        xQ, dtQ = _delta_steps(lay, call.delta[..., t0:t1], call.bias, call.softplus, cdt)
        del xQ  # recomputed at the end: one buffer less during the sweeps
        self.dtQ = dtQ
        # Sub-chunk-local cumulative Δ, S_q = Σ_{j ≤ q in sub-chunk} Δ_j, are the weights of
        # the log-decay gradient telescoping (bounded by P steps: no long-range cancellation).
        # They are running sums in the sweeps (forward in F, S_end − Σ_{j>q} Δ_j in R), not
        # a stored step tensor; the two differ by round-off of order eps · S_end, the order
        # of the telescoping's own round-off.
        self.S_end = dtQ.sum(0).unsqueeze_(-1)  # [B, D, J, 1]
        self.uQ = lay.steps(call.u[..., t0:t1])  # u's dtype: widened exactly where it is used
        # g = ∂L/∂(y before the gate).
        self.gQ = lay.steps(call.dy[..., t0:t1], cdt)
        if call.z is not None:
            self.gQ.mul_(F.silu(lay.steps(call.z[..., t0:t1], cdt)))
        self.BQ = lay.steps_bc(call.Bg[..., t0:t1], cdt)
        self.CQ = lay.steps_bc(call.Cg[..., t0:t1], cdt)
        # keep_t (0 where a document starts) multiplies every decay ā_t the sweeps form: the
        # adjoint of the masked recurrence is the same formula with the masked decays.
        keepQ = _keep_steps(lay, call.seq_idx, t0, t1, cdt)
        self.keep4 = None if keepQ is None else keepQ.unsqueeze(-1).unbind(0)
        self.keep_sub = None if keepQ is None else keepQ.prod(0).unsqueeze_(-1)  # [B, 1, J, 1]
        self.dt4, self.g4 = (x.unsqueeze(-1).unbind(0) for x in (dtQ, self.gQ))
        self.dts, self.us, self.Bs, self.Cs = dtQ.unbind(0), self.uQ.unbind(0), self.BQ.unbind(0), self.CQ.unbind(0)
        # (sub-chunk, position) of the last token T-1 if it is in this group.
        self.j_last, self.q_last = divmod(call.T - 1 - t0, lay.P) if c1 == call.M else (-1, -1)
        self.leave, self.j_leave, self.q_leave = None, -1, -1
        if call.truncated:
            self._window_leaving()

    def _window_leaving(self) -> None:
        """Truncated mode: per position t, C and g at ``t + W`` and the window's decay
        ``Π_{j=t+1}^{t+W} ā_j`` (through ``w = P(t+W) − P(t)``), and the final-state
        cotangent's leaving term at ``T-1-W`` if that is in the group."""
        call, lay, t0, W = self.call, self.lay, self.t0, self.call.W
        n = max(0, min(self.t1, call.T - W) - t0)  # positions t of the group with t + W < T
        gshQ = lay.steps(call.dy[..., t0 + W : t0 + W + n], call.cdt)
        if call.z is not None:
            gshQ.mul_(F.silu(lay.steps(call.z[..., t0 + W : t0 + W + n], call.cdt)))
        CshQ = lay.steps_bc(call.Cg[..., t0 + W : t0 + W + n], call.cdt)
        if call.segments is not None:
            # Nothing leaves a window that a document starts in (its decay is 0).
            seg = call.segments
            gshQ.mul_(lay.steps((seg[:, t0 + W : t0 + W + n] == seg[:, t0 : t0 + n])[:, None].to(call.cdt)))
        wQ = lay.steps(call.prefix(t0 + W, n).sub_(call.prefix(t0, n)) if n else call.dy.new_empty((call.bsz, call.dim, 0)), call.cdt)
        self.w4, self.gsh4, self.Cshs = wQ.unsqueeze(-1).unbind(0), gshQ.unsqueeze(-1).unbind(0), CshQ.unbind(0)
        if call.dfc is not None and t0 <= call.t_leave < self.t1:
            self.j_leave, self.q_leave = divmod(call.t_leave - t0, lay.P)
            self.leave = torch.exp(wQ[self.q_leave, :, :, self.j_leave, None] * call.A_c) * call.dfc
            if call.segments is not None:
                same = call.segments[:, call.T - 1] == call.segments[:, call.t_leave]
                self.leave.mul_(same.to(call.cdt)[:, None, None])

    # -- per-position helpers ----------------------------------------------------------------
    def adjoint_input(self, q: int, base: torch.Tensor | None = None, h: torch.Tensor | None = None) -> torch.Tensor:
        """``base + v`` at in-sub-chunk position q for the group's sub-chunks (fresh,
        ``[B, D, J, N]``; μ_t = v_t + ā_{t+1} μ_{t+1}), or ``v ⊙ h`` given ``h``: then
        ``base`` must be a fresh ``h ⊙ C`` (computed for y already; it is overwritten)."""
        call, lay = self.call, self.lay
        if h is None:
            v = lay.expand(self.Cs[q]) * self.g4[q] if base is None else torch.addcmul(base, lay.expand(self.Cs[q]), self.g4[q])
        else:
            v = base.mul_(self.g4[q])
        if call.truncated:
            leaving = torch.exp(self.w4[q] * call.Ar).mul_(lay.expand(self.Cshs[q])).mul_(self.gsh4[q])
            v -= leaving if h is None else leaving.mul_(h)
            if q == self.q_leave and self.leave is not None:
                v[:, :, self.j_leave] -= self.leave if h is None else self.leave * h[:, :, self.j_leave]
        if q == self.q_last and call.dfc is not None:
            # The final-state cotangent is an output attached to h_{T-1}.
            v[:, :, self.j_last] += call.dfc if h is None else call.dfc * h[:, :, self.j_last]
        return v

    def du_in(self, q: int) -> torch.Tensor:
        """Δ u at position q, ``[B, D, J, 1]``: recomputed (a ``[B, D, J]`` product) rather than
        kept for the group: one step tensor less."""
        return torch.mul(self.dts[q], self.us[q]).unsqueeze_(-1)

    def decay(self, q: int) -> torch.Tensor:
        """``ā_q = keep_q · exp(Δ_q A)``, fresh ``[B, D, J, N]``."""
        a = (self.dt4[q] * self.call.Ar).exp_()
        return a if self.keep4 is None else a.mul_(self.keep4[q])

    def step(self, q: int, h: torch.Tensor) -> torch.Tensor:
        """``h_q = ā_q h_{q-1} + Δ_q u_q B_q``, in the buffer of the fresh ``ā_q``."""
        return self.decay(q).mul_(h).addcmul_(self.du_in(q), self.lay.expand(self.Bs[q]))

    # -- the sweeps ----------------------------------------------------------------------------
    def run(self, nxt: torch.Tensor) -> torch.Tensor:
        """The group's backward. ``nxt`` is the adjoint carry ν entering token t1-1 from the
        right (``ā_{t1} μ_{t1}``); returns the carry entering token t0-1 (dh0 for t0 = 0)."""
        L = self.sweep_local_adjoint()
        decay = self.sweep_states()
        nxt = self.link_adjoints(L, decay, nxt)
        del L, decay
        acc_dA, r = self.chunk_end_terms()
        self.sweep_forward(acc_dA)
        self.sweep_reverse(acc_dA, r)
        self.call.dA.add_(acc_dA.sum((0, 2)))
        del acc_dA, r
        self.local_gradients()
        return nxt

    def sweep_local_adjoint(self) -> torch.Tensor:
        """Sweep L (reverse, sub-chunk-local adjoint from zero): ``L_j = ā_{s_j} μ^loc_{s_j}``,
        ``[B, D, J, N]``. First: it needs no states, so the group's states are not alive
        during it."""
        call = self.call
        carry = self.dtQ.new_zeros((call.bsz, call.dim, self.lay.J, call.N))
        for q in reversed(range(self.lay.P)):
            carry = self.decay(q).mul_(self.adjoint_input(q, carry))
        return carry

    def sweep_states(self) -> torch.Tensor:
        """Sweep 1 (forward, sub-chunk-local states from zero) and a scan over the group's
        sub-chunks from the saved state entering the group: every sub-chunk's entering state
        (``H_in``) and end state (``H_end``, in Sweep 1's buffer). Returns the sub-chunks'
        decays ``Π ā = exp(A · ΣΔ)``, ``[B, D, J, N]``."""
        call = self.call
        h = self.dtQ.new_zeros((call.bsz, call.dim, self.lay.J, call.N))
        for q in range(self.lay.P):
            h = self.step(q, h)
        decay = torch.exp(self.S_end * call.Ar)  # Π ā over each sub-chunk, exp(A · ΣΔ)
        if self.keep_sub is not None:
            decay.mul_(self.keep_sub)  # ... times Π keep: 0 if a document starts inside
        if self.c0 == 0:
            state = self.dtQ.new_zeros((call.bsz, call.dim, call.N)) if call.h0c is None else call.h0c
        else:
            state = call.boundary_states[:, :, self.c0 - 1].to(call.cdt)
        _link_(h, decay, state)  # H_j = P_j · H_{j-1} + h_local_j, in place
        self.H_end = h
        self.H_in = torch.cat([state[:, :, None], h[:, :, :-1]], dim=2)
        return decay

    def link_adjoints(self, L: torch.Tensor, decay: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Reverse scan over the group's sub-chunks: ``ν_j`` = carry entering sub-chunk j from
        the right, ``ν_{j-1} = L_j + P_j ν_j``, starting from the group's right neighbour
        ``nxt``. In place, ``L_j`` becomes ``ν_{j-1}``; sets ``nu`` and returns the group's
        ``ν_{-1}`` (a copy, not a view of the group's L)."""
        _link_(L, decay, nxt, reverse=True)
        self.nu = torch.cat([L[:, :, 1:], nxt[:, :, None]], dim=2)
        return L[:, :, 0].clone()

    def chunk_end_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-chunk-end terms: z at the position after sub-chunk j is ``ν_j ⊙ H_end_j``; the
        log-decay sums start from it. Returns ``(acc_dA = S_end · z_end [B, D, J, N],
        r = Σ_n A_n z_end [B, D, J])``; ``H_end`` is used up."""
        z_end = self.H_end.mul_(self.nu)
        self.H_end = None
        acc_dA = self.S_end * z_end
        r = z_end.mul_(self.call.Ar).sum(-1)
        return acc_dA, r

    def sweep_forward(self, acc_dA: torch.Tensor) -> None:
        """Sweep F (forward): true states from ``H_in`` (used up); emits y (``yQ``, for dz), dC
        (written out), and the forward half of the log-decay telescoping, ``v_q ⊙ ā_q h_{q-1}``
        (README.md, "no cancellation"): ``e_q = Σ_n A v ā h_{q-1}`` per position (``eQ``, for
        Sweep R) and ``Σ_q S_q v ā h_{q-1}`` (added to ``acc_dA``)."""
        call, lay, Ar = self.call, self.lay, self.call.Ar
        h, self.H_in = self.H_in, None
        self.yQ, self.eQ, dCQ = torch.empty_like(self.dtQ), torch.empty_like(self.dtQ), torch.empty_like(self.CQ)
        ys, es, dCs = self.yQ.unbind(0), self.eQ.unbind(0), dCQ.unbind(0)
        S = torch.zeros_like(self.dt4[0])
        for q in range(lay.P):
            Cq = lay.expand(self.Cs[q])
            ah = self.decay(q).mul_(h)  # ā_q h_{q-1}
            h = torch.addcmul(ah, self.du_in(q), lay.expand(self.Bs[q]))
            S = S + self.dt4[q]
            lay.reduce_into(self.g4[q] * h, dCs[q])
            hC = h * Cq
            torch.sum(hC, -1, out=ys[q])
            del hC
            vah = self.adjoint_input(q, ah * Cq, ah)  # v ⊙ ā h_{q-1}, in the buffer of ā h ⊙ C
            del ah
            acc_dA.addcmul_(S, vah)
            torch.sum(vah.mul_(Ar), -1, out=es[q])
            del vah
        del h, Cq
        lay.write_bc(call.dCg[..., self.t0:self.t1], dCQ)

    def sweep_reverse(self, acc_dA: torch.Tensor, r: torch.Tensor) -> None:
        """Sweep R (reverse, true adjoint): μ from ``nu`` (used up); emits dB (written out), du's
        state part ``Δ Σ_n μ B`` (over Δ in ``dtQ``) and dΔ (over e in ``eQ``, each position
        once it is consumed), and the reverse half of the telescoping, ``ā_{q+1} μ_{q+1} ⊙ b_q``
        (the carry entering q from the right, times ``b_q``), which completes
        ``r = Σ_n A_n z_{q,n}`` and ``acc_dA``. (In-place updates keep ~4 ``[B, D, J, N]`` alive.)"""
        call, lay, Ar = self.call, self.lay, self.call.Ar
        carry, self.nu = self.nu, None
        dBQ = torch.empty_like(self.BQ)
        dBs, es = dBQ.unbind(0), self.eQ.unbind(0)
        after = torch.zeros_like(self.S_end)  # Σ_{j > q} Δ_j
        for q in reversed(range(lay.P)):
            Bq = lay.expand(self.Bs[q])
            du_q = self.du_in(q)
            S = self.S_end - after
            after = after + self.dt4[q]
            cb = (carry * Bq).mul_(du_q)  # ā_{q+1} μ_{q+1} ⊙ b_q
            acc_dA.addcmul_(S, cb, value=-1)
            r.add_(es[q]).sub_(cb.mul_(Ar).sum(-1))
            del cb
            mu = self.adjoint_input(q, carry)
            carry = self.decay(q).mul_(mu)
            muB = (mu * Bq).sum(-1)
            torch.addcmul(r, muB, self.us[q], out=es[q])  # dΔ = r + u Σ_n μ B
            torch.mul(muB, self.dts[q], out=self.dts[q])  # du (state part) = Δ Σ_n μ B
            lay.reduce_into(mu.mul_(du_q), dBs[q])
            del mu
        lay.write_bc(call.dBg[..., self.t0:self.t1], dBQ)
        # B and the window's leaving terms are used up.
        self.BQ = self.Bs = self.w4 = self.gsh4 = self.Cshs = None

    def local_gradients(self) -> None:
        """The gradients local to each position, written out: dz (needs y), du (+ D g), dD,
        dδ (dΔ through softplus), dbias."""
        call, lay, t0, t1 = self.call, self.lay, self.t0, self.t1
        cdt, Dq = call.cdt, call.Dq
        yQ, duQ, ddtQ = self.yQ, self.dtQ, self.eQ
        self.yQ = self.dtQ = self.eQ = self.dt4 = self.dts = None
        if call.z is not None:
            if Dq is not None:
                yQ.addcmul_(Dq, self.uQ)  # y before the gate
            yQ.mul_(lay.steps(call.dy[..., t0:t1], cdt)).mul_(_silu_grad(lay.steps(call.z[..., t0:t1], cdt)))
            lay.write(call.dz[..., t0:t1], yQ)
        del yQ
        if Dq is not None:
            duQ.addcmul_(Dq, self.gQ)
            call.dD.add_((self.gQ * self.uQ).sum((0, 1, 3)))
        lay.write(call.du[..., t0:t1], duQ)
        del duQ
        self.gQ = self.g4 = self.uQ = self.us = None
        if call.softplus:
            xQ, _ = _delta_steps(lay, call.delta[..., t0:t1], call.bias, False, cdt)
            ddtQ.mul_(_softplus_grad_(xQ))
            del xQ
        lay.write(call.dx[..., t0:t1], ddtQ)
        if call.ddb is not None:
            call.ddb.add_(lay.zero_pad(ddtQ).sum((0, 1, 3)))
