"""Mamba-2 SSD (structured state-space duality) scan with an adjoint-sharded, chunked backward.

Public API:

* :func:`ssd_scan` — the differentiable op (``longctx::ssd_fwd`` with a registered backward
  ``longctx::ssd_bwd``): saved memory O(T/Q · B·H·P·N) beyond the inputs.
* :func:`ssd_reference` — the plain-torch sequential spec.
* :func:`ssd_chunked_fwd`, :func:`ssd_chunked_bwd` — the chunked torch implementation (the
  CPU path), usable directly.

The math (indices, SSD chunk form, adjoint, seq_idx resets, memory) is in README.md.
"""

from __future__ import annotations

import torch

from ._args import DEFAULT_CHUNK, check_chunk, limits, validate
from .chunked import ssd_chunked_bwd, ssd_chunked_fwd
from .op import ssd_bwd, ssd_fwd  # noqa: F401 - registers longctx::ssd_fwd / ssd_bwd
from .reference import ssd_reference

__all__ = ["ssd_scan", "ssd_reference", "ssd_chunked_fwd", "ssd_chunked_bwd", "DEFAULT_CHUNK"]


def ssd_scan(
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
    chunk_size: int = DEFAULT_CHUNK,
    return_final_states: bool = False,
):
    """Mamba-2 SSD scan (mamba_ssm's ``mamba_chunk_scan_combined``) with chunk-boundary-only
    saved state and an exact adjoint-sharded backward.

    Args:
        x: ``[B, T, H, P]``; dt: ``[B, T, H]``; A: ``[H]`` (negative); B, C: ``[B, T, G, N]``
            (head h reads group ``h // (H // G)``); D: ``[H]`` or ``[H, P]``; z: ``[B, T, H, P]``
            (``out = y · silu(z)``); dt_bias: ``[H]``; initial_states: ``[B, H, P, N]``;
            seq_idx: ``[B, T]`` int32/int64 (semantics of :func:`ssd_reference`).
        dt_softplus: ``Δ = softplus(dt + dt_bias)``.
        dt_limit: ``(lo, hi)``: clamp Δ after bias and softplus (zero gradient where clamped).
        chunk_size: Q, the time-chunk length. Saved for backward: the inputs and
            ``⌈T/Q⌉·B·H·P·N`` chunk-end states.
        return_final_states: also return the final state ``[B, H, P, N]`` (differentiable).

    Returns:
        ``out [B, T, H, P]`` in x's dtype, or ``(out, final_states)`` (final state in the compute
        dtype: float32 for 16-bit inputs, float64 stays float64).
    """
    validate(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx)
    check_chunk(chunk_size)
    lo, hi = limits(dt_limit)
    out, final, _ = torch.ops.longctx.ssd_fwd(
        x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), lo, hi, initial_states, seq_idx, chunk_size,
    )
    return (out, final) if return_final_states else out
