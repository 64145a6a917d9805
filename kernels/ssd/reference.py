"""Plain-torch sequential SSD scan: the executable spec of ``longctx::ssd``.

Semantics (per batch b, head h, time t; head h reads group ``h // (H // G)`` of B and C;
README.md has the indices)::

    Δ_t = clamp(softplus(dt_t + dt_bias_h), lo, hi)    (bias, softplus, clamp optional)
    a_t = exp(Δ_t · A_h) · [no reset at t]              (scalar decay per head)
    h_t = a_t · h_{t-1} + Δ_t · x_t ⊗ B_t               (h: [P, N]; h_{-1} = initial state or 0)
    y_t = h_t · C_t + D ⊙ x_t                           (then · silu(z_t) if z is given)

A reset happens at ``t ≥ 1`` where ``seq_idx[t] != seq_idx[t-1]`` (a new packed document
starts with a zero state), so the initial state reaches the first document only.

The loop is over time with ordinary autograd: it keeps every per-step state for backward
(O(B·T·H·P·N) memory) and is meant for tests and small inputs.
"""

from __future__ import annotations

import torch

from ._args import compute_dtype, effective_dt, epilogue, limits, skip_weight, validate

__all__ = ["ssd_reference"]


def ssd_reference(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    *,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    dt_bias: torch.Tensor | None = None,
    dt_softplus: bool = False,
    dt_limit: tuple[float, float] | None = None,
    initial_states: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    return_final_states: bool = False,
):
    """Sequential, differentiable SSD scan.

    Args:
        x: ``[B, T, H, P]`` input.
        dt: ``[B, T, H]`` step sizes before bias/softplus/clamp.
        A: ``[H]`` scalar decay rate per head (negative).
        B, C: ``[B, T, G, N]``; head h uses group ``h // (H // G)``.
        D: optional ``[H]`` or ``[H, P]`` skip connection.
        z: optional ``[B, T, H, P]`` gate: ``y ← y · silu(z)``.
        dt_bias: optional ``[H]`` added to dt before the softplus.
        dt_softplus: apply ``softplus`` to ``dt + dt_bias``.
        dt_limit: optional ``(lo, hi)``: clamp Δ after bias and softplus.
        initial_states: optional ``[B, H, P, N]`` state before step 0 (zero when omitted).
        seq_idx: optional ``[B, T]`` int32/int64 document index: the state resets where it
            changes.
        return_final_states: also return ``h_{T-1}``.

    Returns:
        ``y [B, T, H, P]`` in x's dtype, and with ``return_final_states`` the final state
        ``[B, H, P, N]`` in the compute dtype (float32 for 16-bit inputs; float64 stays).
    """
    dims = validate(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    lo, hi = limits(dt_limit)
    cdt = compute_dtype(x, A, D, dt_bias, initial_states)
    xc = x.to(cdt)
    delta, _ = effective_dt(dt.to(cdt), None if dt_bias is None else dt_bias.to(cdt), dt_softplus, lo, hi)
    # [B, T, G, N] → [B, T, H, N]: head h reads group h // rep.
    Bh = B.to(cdt).repeat_interleave(dims.rep, dim=2)
    Ch = C.to(cdt).repeat_interleave(dims.rep, dim=2)
    shape = (dims.batch, dims.heads, dims.headdim, dims.dstate)
    h = x.new_zeros(shape, dtype=cdt) if initial_states is None else initial_states.to(cdt)
    ys = []
    for t in range(dims.seqlen):
        a = torch.exp(delta[:, t] * A.to(cdt))  # [B, H]
        if seq_idx is not None and t > 0:
            a = a * (seq_idx[:, t] == seq_idx[:, t - 1]).to(cdt)[:, None]
        h = a[:, :, None, None] * h + (delta[:, t, :, None] * xc[:, t])[..., None] * Bh[:, t, :, None, :]
        ys.append((h * Ch[:, t, :, None, :]).sum(-1))
    y = epilogue(torch.stack(ys, dim=1), xc, skip_weight(D, cdt), None if z is None else z.to(cdt)).to(x.dtype)
    return (y, h) if return_final_states else y
