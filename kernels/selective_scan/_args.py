"""Argument validation and dtype rules shared by every selective-scan implementation.

Layout (chosen once, mamba's): ``u, delta, z: [B, D, T]``, ``A: [D, N]``,
``B, C: [B, N, T]`` (one group) or ``[B, G, N, T]`` (channel ``d`` uses group
``d // (D // G)``), ``D, delta_bias: [D]``, ``h0: [B, D, N]``, ``seq_idx: [B, T]``
(int32/int64 document index: the state resets at ``t ≥ 1`` where it changes from ``t-1``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class ScanDims:
    """Sizes of one selective-scan call.

    ``grouped`` records whether B/C came in as ``[B, G, N, T]`` (so gradients go back in
    that layout) or as ``[B, N, T]`` (G = 1).
    """

    batch: int
    dim: int
    seqlen: int
    dstate: int
    groups: int
    grouped_b: bool
    grouped_c: bool


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype the scan runs in: float64 if any input is float64, else float32.

    16-bit inputs are computed in float32 (mamba's rule: the recurrence accumulates over T
    steps and would lose all precision in 16 bits); float64 stays float64.
    """
    dt = torch.float32
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point() or t.is_complex():
        raise TypeError(f"selective_scan: {name} must be a real floating-point tensor, got {t.dtype}")


def validate(u, delta, A, B, C, D=None, z=None, delta_bias=None, h0=None, seq_idx=None) -> ScanDims:
    """Check shapes, dtypes and devices; return the sizes. Raises ValueError/TypeError.

    Shapes: see the module docstring. ``u, delta, z`` (and B/C) must share a dtype, as in
    mamba; ``A, D, delta_bias, h0`` may be in a wider dtype (e.g. float32 parameters with
    bfloat16 activations).
    """
    for name, t in (("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C)):
        _check_float(name, t)
    for name, t in (("D", D), ("z", z), ("delta_bias", delta_bias), ("h0", h0)):
        if t is not None:
            _check_float(name, t)
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [batch, dim, seqlen], got shape {tuple(u.shape)}")
    bsz, dim, seqlen = u.shape
    if seqlen < 1:
        raise ValueError("selective_scan: seqlen must be at least 1")
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be [dim={dim}, dstate] (real, diagonal), got {tuple(A.shape)}")
    dstate = A.shape[1]
    groups = None
    grouped = {}
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            g, grouped[name] = 1, False
            want = (bsz, dstate, seqlen)
            got = tuple(t.shape)
        elif t.dim() == 4:
            g, grouped[name] = t.shape[1], True
            want = (bsz, g, dstate, seqlen)
            got = tuple(t.shape)
        else:
            raise ValueError(f"selective_scan: {name} must be [batch, dstate, seqlen] or [batch, groups, dstate, seqlen], got {tuple(t.shape)}")
        if got != want:
            raise ValueError(f"selective_scan: {name} has shape {got}, expected {want}")
        if g < 1 or dim % g != 0:
            raise ValueError(f"selective_scan: {name} has {g} groups, which must divide dim={dim}")
        if groups is not None and g != groups:
            raise ValueError(f"selective_scan: B and C must have the same number of groups ({groups} vs {g})")
        groups = g
    if D is not None and tuple(D.shape) != (dim,):
        raise ValueError(f"selective_scan: D must be [dim={dim}], got {tuple(D.shape)}")
    if delta_bias is not None and tuple(delta_bias.shape) != (dim,):
        raise ValueError(f"selective_scan: delta_bias must be [dim={dim}], got {tuple(delta_bias.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    if h0 is not None and tuple(h0.shape) != (bsz, dim, dstate):
        raise ValueError(f"selective_scan: h0 must be [batch, dim, dstate] = {(bsz, dim, dstate)}, got {tuple(h0.shape)}")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"selective_scan: seq_idx must be an int32 or int64 tensor, got {getattr(seq_idx, 'dtype', type(seq_idx).__name__)}")
        if tuple(seq_idx.shape) != (bsz, seqlen):
            raise ValueError(f"selective_scan: seq_idx must be [batch, seqlen] = {(bsz, seqlen)}, got {tuple(seq_idx.shape)}")
    act = [("delta", delta), ("B", B), ("C", C)] + ([("z", z)] if z is not None else [])
    for name, t in act:
        if t.dtype != u.dtype:
            raise TypeError(f"selective_scan: {name} has dtype {t.dtype} but u has {u.dtype}; cast them to one dtype")
    for name, t in (("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("delta_bias", delta_bias), ("h0", h0),
                    ("seq_idx", seq_idx)):
        if t is not None and t.device != u.device:
            raise ValueError(f"selective_scan: {name} is on {t.device} but u is on {u.device}")
    return ScanDims(bsz, dim, seqlen, dstate, groups, grouped["B"], grouped["C"])


def as_grouped(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, T]`` → ``[B, 1, N, T]``; grouped tensors pass through."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def effective_delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool) -> torch.Tensor:
    """``Δ = softplus(δ + bias)`` (bias and softplus optional), shape ``[B, D, T]``."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    if delta_softplus:
        delta = torch.nn.functional.softplus(delta)
    return delta


def resets(seq_idx: torch.Tensor, t0: int, t1: int) -> torch.Tensor:
    """Where the state resets among tokens ``[t0, t1)``: ``[B, t1 - t0]`` bool, True at
    ``t ≥ 1`` where ``seq_idx[t] != seq_idx[t-1]`` (a new document starts). Token 0 never
    resets: the initial state applies there. ``keep_t = 1 - reset_t`` multiplies the step's
    decay ``ā_t``."""
    cur = seq_idx[:, t0:t1]
    if t0 == 0:
        prev = torch.cat([cur[:, :1], cur[:, :-1]], dim=1)
    else:
        prev = seq_idx[:, t0 - 1 : t1 - 1]
    return cur != prev


def segments(seq_idx: torch.Tensor) -> torch.Tensor:
    """Segment number of every token, ``[B, T]`` int64: the number of resets in ``[1, t]``.
    Tokens ``j ≤ i`` are linked through the state iff their segment numbers are equal."""
    return resets(seq_idx, 0, seq_idx.shape[1]).to(torch.int64).cumsum(1)
