"""Argument validation, dtype rules and the step-size map shared by every SSD implementation.

Layout (chosen once, mamba_ssm's ``mamba_chunk_scan_combined``): ``x, z: [B, T, H, P]``,
``dt: [B, T, H]``, ``A, dt_bias: [H]``, ``B, C: [B, T, G, N]`` (head ``h`` reads group
``h // (H // G)``), ``D: [H]`` or ``[H, P]``, ``initial_states: [B, H, P, N]``,
``seq_idx: [B, T]`` (int32/int64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: Chunk length used when the graph carries the "not planned" value ``chunk_size = 0``.
DEFAULT_CHUNK = 256

#: softplus' linear regime: ``softplus(v) = v`` above it (torch's and mamba_ssm's threshold).
SOFTPLUS_THRESHOLD = 20.0


@dataclass(frozen=True)
class SSDDims:
    """Sizes of one SSD call."""

    batch: int
    seqlen: int
    heads: int
    headdim: int
    groups: int
    dstate: int

    @property
    def rep(self) -> int:
        """Heads per group."""
        return self.heads // self.groups


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """float64 if any input is float64, else float32: 16-bit inputs are computed in float32
    (the scan accumulates over T steps), float64 stays float64."""
    dt = torch.float32
    for t in tensors:
        if t is not None:
            dt = torch.promote_types(dt, t.dtype)
    return dt


def check_chunk(chunk_size: int) -> int:
    """A positive int chunk length, or ValueError."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"ssd_scan: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


def limits(dt_limit) -> tuple[float, float]:
    """``dt_limit`` (None or ``(lo, hi)``) → ``(lo, hi)`` floats; ``(-inf, inf)`` means no clamp."""
    if dt_limit is None:
        return -math.inf, math.inf
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"ssd_scan: dt_limit must be None or a pair (lo, hi) of floats, got {dt_limit!r}") from None
    if not lo <= hi:
        raise ValueError(f"ssd_scan: dt_limit must have lo <= hi, got {dt_limit!r}")
    return lo, hi


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"ssd_scan: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"ssd_scan: {name} must be a real floating-point tensor, got {t.dtype}")


def _check_shape(name: str, t: torch.Tensor, want: tuple[int, ...], what: str) -> None:
    if tuple(t.shape) != want:
        raise ValueError(f"ssd_scan: {name} must be {what} = {want}, got {tuple(t.shape)}")


def validate(x, dt, A, B, C, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None) -> SSDDims:
    """Check shapes, dtypes and devices; return the sizes. Raises ValueError/TypeError.

    ``x, dt, B, C, z`` must share a dtype (the activations); ``A, D, dt_bias,
    initial_states`` may be wider (float32 parameters with bfloat16 activations).
    """
    for name, t in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        _check_float(name, t)
    for name, t in (("D", D), ("z", z), ("dt_bias", dt_bias), ("initial_states", initial_states)):
        if t is not None:
            _check_float(name, t)
    if x.dim() != 4:
        raise ValueError(f"ssd_scan: x must be [batch, seqlen, heads, headdim], got shape {tuple(x.shape)}")
    bsz, seqlen, heads, headdim = x.shape
    if seqlen < 1:
        raise ValueError("ssd_scan: seqlen must be at least 1")
    _check_shape("dt", dt, (bsz, seqlen, heads), "[batch, seqlen, heads]")
    _check_shape("A", A, (heads,), "[heads] (one scalar decay per head)")
    if B.dim() != 4:
        raise ValueError(f"ssd_scan: B must be [batch, seqlen, groups, dstate], got shape {tuple(B.shape)}")
    groups, dstate = B.shape[2], B.shape[3]
    if groups < 1 or heads % groups != 0:
        raise ValueError(f"ssd_scan: B has {groups} groups, which must divide heads={heads}")
    _check_shape("B", B, (bsz, seqlen, groups, dstate), "[batch, seqlen, groups, dstate]")
    _check_shape("C", C, (bsz, seqlen, groups, dstate), "B's shape [batch, seqlen, groups, dstate]")
    if D is not None and tuple(D.shape) not in ((heads,), (heads, headdim)):
        raise ValueError(f"ssd_scan: D must be [heads={heads}] or [heads, headdim] = {(heads, headdim)}, got {tuple(D.shape)}")
    if z is not None:
        _check_shape("z", z, tuple(x.shape), "x's shape [batch, seqlen, heads, headdim]")
    if dt_bias is not None:
        _check_shape("dt_bias", dt_bias, (heads,), "[heads]")
    if initial_states is not None:
        _check_shape("initial_states", initial_states, (bsz, heads, headdim, dstate), "[batch, heads, headdim, dstate]")
    if seq_idx is not None:
        if not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ssd_scan: seq_idx must be an int32 or int64 tensor, got {getattr(seq_idx, 'dtype', type(seq_idx).__name__)}")
        _check_shape("seq_idx", seq_idx, (bsz, seqlen), "[batch, seqlen]")
    for name, t in (("dt", dt), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"ssd_scan: {name} has dtype {t.dtype} but x has {x.dtype}; cast them to one dtype")
    for name, t in (("dt", dt), ("A", A), ("B", B), ("C", C), ("D", D), ("z", z), ("dt_bias", dt_bias),
                    ("initial_states", initial_states), ("seq_idx", seq_idx)):
        if t is not None and t.device != x.device:
            raise ValueError(f"ssd_scan: {name} is on {t.device} but x is on {x.device}")
    return SSDDims(bsz, seqlen, heads, headdim, groups, dstate)


def check_backward_args(dims: SSDDims, chunk: int, boundary_states, dout, dfinal) -> None:
    """Shapes of the backward's extra inputs: chunk-end states ``[B, H, ⌈T/Q⌉, P, N]``, ``dout``
    like x, ``dfinal`` (optional) like a state. Raises ValueError."""
    d = dims
    want = (d.batch, d.heads, math.ceil(d.seqlen / chunk), d.headdim, d.dstate)
    if tuple(boundary_states.shape) != want:
        raise ValueError(f"ssd_scan: boundary_states must be {want} for chunk_size={chunk}, got {tuple(boundary_states.shape)}")
    if tuple(dout.shape) != (d.batch, d.seqlen, d.heads, d.headdim):
        raise ValueError(f"ssd_scan: dout must have x's shape {(d.batch, d.seqlen, d.heads, d.headdim)}, got {tuple(dout.shape)}")
    if dfinal is not None and tuple(dfinal.shape) != want[:2] + want[3:]:
        raise ValueError(f"ssd_scan: dfinal must be {want[:2] + want[3:]}, got {tuple(dfinal.shape)}")


def effective_dt(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool, lo: float, hi: float):
    """``Δ = clamp(softplus(dt + bias), lo, hi)`` (each step optional), ``[B, T, H]``.

    Returns ``(Δ, dΔ/d dt)``: the derivative is ``softplus'(dt + bias)`` (1 in softplus'
    linear regime, as torch's) times the clamp's pass mask (torch.clamp's: 1 where
    ``lo <= v <= hi``, else 0). The bias gradient is its sum over batch and time.
    """
    v = dt if dt_bias is None else dt + dt_bias
    grad = torch.ones_like(v)
    if softplus:
        grad = torch.where(v > SOFTPLUS_THRESHOLD, grad, torch.sigmoid(v))
        v = F.softplus(v, threshold=SOFTPLUS_THRESHOLD)
    if lo > -math.inf or hi < math.inf:
        grad = grad * ((v >= lo) & (v <= hi)).to(v.dtype)
        v = v.clamp(lo, hi)
    return v, grad


def resets(seq_idx: torch.Tensor | None, bsz: int, seqlen: int, device) -> torch.Tensor | None:
    """Segment number of every token, ``[B, T]`` int64: it counts the positions ``t ≥ 1``
    where ``seq_idx`` changes from ``t-1`` to ``t`` (where the state is reset). Token ``i``
    sees token ``j ≤ i`` through the state iff both have the same segment number; the first
    segment (number 0) is the one the initial state applies to. None without seq_idx."""
    if seq_idx is None:
        return None
    change = torch.zeros((bsz, seqlen), dtype=torch.int64, device=device)
    change[:, 1:] = (seq_idx[:, 1:] != seq_idx[:, :-1]).to(torch.int64)
    return change.cumsum(1)


def skip_weight(D: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """D (``[H]`` or ``[H, P]``) in ``dtype``, broadcastable against ``[..., H, P]``."""
    if D is None:
        return None
    D = D.to(dtype)
    return D[:, None] if D.dim() == 1 else D


def epilogue(y: torch.Tensor, x: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    """``out = (y + D ⊙ x) · silu(z)`` (D as :func:`skip_weight`; D and z optional), ``[B, T, H, P]``."""
    if D is not None:
        y = y + D * x
    if z is not None:
        y = y * F.silu(z)
    return y


def gate_cotangent(dout: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    """``g = ∂L/∂y`` (before the gate) from ``∂L/∂out``: ``dout · silu(z)``."""
    return dout if z is None else dout * F.silu(z)


def epilogue_backward(y, x, dout, g, D, z):
    """The gradients the epilogue adds, for SSM output ``y`` and ``g = gate_cotangent(dout, z)``:
    ``(D ⊙ g`` (x's skip part), ``Σ_{b,t} g ⊙ x`` (``[H, P]``: D's), ``dz)``; None where D or z is None."""
    dx_skip = dD = dz = None
    if D is not None:
        dx_skip = D * g
        dD = (g * x).sum((0, 1))
        y = y + D * x
    if z is not None:
        dz = dout * y * silu_grad(z)
    return dx_skip, dD, dz


def reduce_skip_grad(dD: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """``[H, P]`` gradient → D's shape (summed over P for ``D: [H]``) and dtype."""
    return (dD.sum(-1) if D.dim() == 1 else dD).to(D.dtype)


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    """``d silu(z) / dz = σ(z) (1 + z (1 − σ(z)))``."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))
