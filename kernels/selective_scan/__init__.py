"""Selective scan (Mamba-style, diagonal A) with an adjoint-sharded, chunked backward.

Public API:

* :func:`selective_scan` — the differentiable op (``longctx::selective_scan_fwd`` with a
  registered backward ``longctx::selective_scan_bwd``): memory O(T/Q · D · N) for the scan.
* :func:`selective_scan_reference` — the plain-torch sequential spec.
* :func:`selective_scan_chunked_fwd`, :func:`selective_scan_chunked_bwd` — the chunked
  torch implementation (the CPU path), usable directly.

The math (indices, adjoint, chunk schedule, truncated identity, memory) is in README.md.
"""

from __future__ import annotations

import torch

from ._args import validate
from .chunked import MODES, selective_scan_chunked_bwd, selective_scan_chunked_fwd
from .op import DEFAULT_CHUNK
from .reference import selective_scan_reference
from .schema import ScanArgs

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_chunked_fwd",
    "selective_scan_chunked_bwd",
    "DEFAULT_CHUNK",
    "MODES",
    "ScanArgs",
]


def selective_scan(
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
    *,
    return_final_state: bool = False,
    chunk_size: int = DEFAULT_CHUNK,
    mode: str = "exact",
    window: int | None = None,
    seq_idx: torch.Tensor | None = None,
):
    """Selective scan with chunk-boundary-only saved state (exact or truncated adjoint).

    Args:
        u: ``[B, D, T]``; delta: ``[B, D, T]``; A: ``[D, N]``; B, C: ``[B, N, T]`` or
            ``[B, G, N, T]``; D, delta_bias: ``[D]``; z: ``[B, D, T]``; h0: ``[B, D, N]``
            (semantics of :func:`selective_scan_reference`).
        return_final_state: also return the final state ``[B, D, N]`` (differentiable).
        chunk_size: Q, the time-chunk length. Saved memory is ``⌈T/Q⌉·B·D·N`` states;
            the backward's working set is a few ``[B, D, ⌈T/Q⌉, N]`` tensors on the CPU path.
        mode: ``"exact"`` (default) or ``"truncated"`` — the windowed adjoint of the
            adjoint-sharding paper: the gradients that flow through the state (u, delta,
            delta_bias, A, B, h0) keep only contributions of outputs less than ``window``
            steps later. It is an approximation and biased; it equals the exact gradient
            when ``window >= T``.
        window: T̄ ≥ 1, required with ``mode="truncated"``.
        seq_idx: optional ``[B, T]`` int32/int64 document index (packed sequences): the state
            resets at ``t ≥ 1`` where it changes, so each document is scanned as if alone (the
            first from h0). Exact, forward and backward (README.md, "Documents").

    Returns:
        ``y [B, D, T]`` in u's dtype, or ``(y, final_state)`` with ``return_final_state``
        (final state in the compute dtype: float32 for 16-bit inputs).
    """
    validate(u, delta, A, B, C, D, z, delta_bias, h0, seq_idx)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"selective_scan: chunk_size must be a positive int, got {chunk_size!r}")
    if mode not in MODES:
        raise ValueError(f"selective_scan: mode must be one of {MODES}, got {mode!r}")
    if mode == "truncated":
        if window is None or not isinstance(window, int) or window < 1:
            raise ValueError(f"selective_scan: mode='truncated' needs an int window >= 1, got {window!r}")
    elif window is not None:
        raise ValueError("selective_scan: window is only meaningful with mode='truncated'")
    y, final, _ = torch.ops.longctx.selective_scan_fwd(*ScanArgs(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), h0,
        chunk_size=chunk_size, mode=mode, window=0 if window is None else window, seq_idx=seq_idx,
    ))
    return (y, final) if return_final_state else y
