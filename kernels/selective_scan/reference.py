"""Plain-torch sequential selective scan: the executable spec of ``longctx::selective_scan``.

Semantics (per batch b, channel d, state n, time t; see README.md)::

    Δ_t = softplus(δ_t + bias_d)            (bias and softplus optional)
    ā_t = keep_t · exp(Δ_t · A_dn)          (keep_t = 0 where a document starts, else 1)
    h_t = ā_t · h_{t-1} + Δ_t · B_tn · u_t   (h_{-1} = h0, default 0)
    y_t = Σ_n C_tn · h_t + D_d · u_t         (then · silu(z_t) if z is given)

With ``seq_idx`` (packed documents), ``keep_t = 0`` at ``t ≥ 1`` where ``seq_idx[t] !=
seq_idx[t-1]``: the state restarts from zero with each document's first token, so every
document is scanned as if alone (the first from h0). Without it ``keep_t = 1``.

The loop is over time, one step per iteration, with ordinary autograd: it keeps every
per-step state for backward (O(B·D·T·N) memory) and is meant for tests and small inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._args import as_grouped, compute_dtype, effective_delta, resets, validate

__all__ = ["selective_scan_reference"]


def selective_scan_reference(
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
    return_final_state: bool = False,
    seq_idx: torch.Tensor | None = None,
):
    """Sequential, differentiable selective scan.

    Args:
        u: ``[B, D, T]`` input.
        delta: ``[B, D, T]`` step sizes before bias/softplus.
        A: ``[D, N]`` real diagonal state matrix (usually negative).
        B, C: ``[B, N, T]`` or grouped ``[B, G, N, T]``; channel d uses group ``d // (D // G)``.
        D: optional ``[D]`` skip connection.
        z: optional ``[B, D, T]`` gate: ``y ← y · silu(z)``.
        delta_bias: optional ``[D]`` added to delta before the softplus.
        delta_softplus: apply ``softplus`` to ``delta + delta_bias``.
        h0: optional ``[B, D, N]`` initial state (zero when omitted).
        return_final_state: also return ``h_{T-1}``.
        seq_idx: optional ``[B, T]`` int32/int64 document index; the state resets where it
            changes (mamba_ssm's packed-document convention).

    Returns:
        ``y: [B, D, T]`` in ``u``'s dtype, and with ``return_final_state`` the final state
        ``[B, D, N]`` in the compute dtype (float32 for 16-bit inputs, like mamba's
        ``last_state``; float64 inputs stay float64).
    """
    dims = validate(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx)
    cdt = compute_dtype(u, A, D, delta_bias, h0)
    rep = dims.dim // dims.groups
    uc = u.to(cdt)
    dt = effective_delta(delta.to(cdt), None if delta_bias is None else delta_bias.to(cdt), delta_softplus)
    Ac = A.to(cdt)
    # [B, G, N, T] → [B, D, N, T]: channel d reads group d // rep.
    Bc = as_grouped(B).to(cdt).repeat_interleave(rep, dim=1)
    Cc = as_grouped(C).to(cdt).repeat_interleave(rep, dim=1)
    h = torch.zeros(dims.batch, dims.dim, dims.dstate, dtype=cdt, device=u.device) if h0 is None else h0.to(cdt)
    keep = None if seq_idx is None else (~resets(seq_idx, 0, dims.seqlen)).to(cdt)[:, :, None, None]  # [B, T, 1, 1]
    ys = []
    for t in range(dims.seqlen):
        dA = torch.exp(dt[:, :, t, None] * Ac)
        if keep is not None:
            dA = dA * keep[:, t]
        h = dA * h + (dt[:, :, t] * uc[:, :, t])[:, :, None] * Bc[:, :, :, t]
        ys.append((h * Cc[:, :, :, t]).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(cdt)[:, None] * uc
    if z is not None:
        y = y * F.silu(z.to(cdt))
    y = y.to(u.dtype)
    return (y, h) if return_final_state else y
