"""Plain-torch LM head + cross-entropy: the executable specification of the tiled op.

Layout (chosen once):

* ``h``: ``[N, H]`` hidden states, one row per token (the model's ``[B, T, H]`` flattened)
* ``weight``: ``[V, H]`` the head (``nn.Linear(H, V).weight``), ``bias``: ``[V]`` or None
* ``labels``: ``[N]`` int64 class indices; entries equal to ``ignore_index`` are skipped
* result: a scalar loss, ``reduction="mean"`` (over the non-ignored tokens) or ``"sum"``

This module materialises the ``[N, V]`` logits on purpose: it is the ground truth the tiled
implementation is tested against, not something to run at scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["linear_cross_entropy_reference", "validate_arguments", "accumulation_dtype", "transform_logits", "check_transform", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype logits, log-sum-exp and weight gradients are computed in: float64 stays float64,
    everything else uses float32 (as ``transformers`` upcasts logits before the loss)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def transform_logits(z: Tensor, logit_scale: float, softcap: float) -> Tensor:
    """What some heads do to their logits before the loss, in the accumulation dtype:
    ``z · logit_scale`` (Cohere's ``logit_scale``; Granite's ``/ logits_scaling`` is the scale
    ``1 / logits_scaling``), then, with ``softcap > 0``, ``softcap · tanh(z / softcap)`` (Gemma's
    final soft-capping)."""
    if logit_scale != 1.0:
        z = z * logit_scale
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z


def check_transform(logit_scale: float, softcap: float, name: str) -> None:
    import math

    for arg_name, v in (("logit_scale", logit_scale), ("softcap", softcap)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise TypeError(f"{name}: {arg_name} must be a finite float, got {v!r}")
    if softcap < 0:
        raise ValueError(f"{name}: softcap must be > 0 (or 0: none), got {softcap}")


def validate_arguments(
    h: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, logits: Tensor | None,
    ignore_index: int, reduction: str, chunk_size: int | None, name: str, *, autocast: bool = False,
) -> None:
    """Raise ``TypeError``/``ValueError`` with a remedy when the arguments do not fit the layout.

    ``autocast``: an autocast region is active on ``h``'s device, so ``h``, ``weight`` and
    ``bias`` may come in different float dtypes (the op casts them, as autocast casts a
    ``linear``'s operands).
    """
    for arg_name, t in (("h", h), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg_name} must be a torch.Tensor, got {type(t).__name__}")
    if h.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: h has dtype {h.dtype}; use float16, bfloat16, float32 or float64")
    if weight.dtype != h.dtype and not (autocast and weight.dtype in _FLOAT_DTYPES):
        raise TypeError(f"{name}: weight ({weight.dtype}) and h ({h.dtype}) must share one dtype, as F.linear requires")
    if h.dim() != 2:
        raise ValueError(f"{name}: h must be 2-D [tokens, hidden], got shape {tuple(h.shape)}; flatten it with h.reshape(-1, H)")
    if weight.dim() != 2 or weight.shape[1] != h.shape[1]:
        raise ValueError(f"{name}: weight must be [vocab, hidden] = [V, {h.shape[1]}], got shape {tuple(weight.shape)}")
    V = weight.shape[0]
    if V == 0:
        raise ValueError(f"{name}: the vocabulary is empty (weight has 0 rows)")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"{name}: bias must be a Tensor or None, got {type(bias).__name__}")
        if (bias.dtype != h.dtype and not (autocast and bias.dtype in _FLOAT_DTYPES)) or tuple(bias.shape) != (V,):
            raise ValueError(f"{name}: bias must be [V] = [{V}] in {h.dtype}, got {tuple(bias.shape)} in {bias.dtype}")
    if labels.dtype != torch.int64:
        raise TypeError(f"{name}: labels must be int64 class indices, got {labels.dtype}; soft (probability) targets are not supported")
    if tuple(labels.shape) != (h.shape[0],):
        raise ValueError(f"{name}: labels must be [N] = [{h.shape[0]}] (one per row of h), got shape {tuple(labels.shape)}")
    if logits is not None:
        if not isinstance(logits, Tensor):
            raise TypeError(f"{name}: logits must be a Tensor or None, got {type(logits).__name__}")
        if logits.dtype not in _FLOAT_DTYPES or tuple(logits.shape) != (h.shape[0], V):
            raise ValueError(f"{name}: logits must be float [N, V] = [{h.shape[0]}, {V}], got {tuple(logits.shape)} in {logits.dtype}")
    devices = {t.device for t in (h, weight, labels, bias, logits) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{name}: all tensors must be on one device, got {sorted(map(str, devices))}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{name}: ignore_index must be an int, got {type(ignore_index).__name__}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{name}: reduction must be one of {REDUCTIONS}, got {reduction!r} (per-token losses would be [N], use F.cross_entropy)")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{name}: chunk_size must be an int, got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")


def linear_cross_entropy_reference(
    h: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias), labels)`` with the logits upcast.

    Args:
        h: ``[N, H]``; weight: ``[V, H]``; bias: ``[V]`` or None; labels: ``[N]`` int64.
        ignore_index: label value whose tokens contribute nothing (``-100`` in ``transformers``).
        reduction: ``"mean"`` over the non-ignored tokens (NaN when every label is ignored,
            as ``F.cross_entropy``), or ``"sum"``.
        logit_scale, softcap: the logits' transform before the loss (:func:`transform_logits`).
    Returns:
        the scalar loss in the accumulation dtype (float32, or float64 for float64 inputs).

    The logits are computed by ``F.linear`` in the input dtype and then upcast, which is what
    ``transformers`` does (``logits.float()`` before the loss), so a float64 call is a
    float64 ground truth.
    """
    validate_arguments(h, weight, bias, labels, None, ignore_index, reduction, None, "linear_cross_entropy_reference")
    check_transform(logit_scale, softcap, "linear_cross_entropy_reference")
    logits = transform_logits(F.linear(h, weight, bias).to(accumulation_dtype(h.dtype)), logit_scale, softcap)
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
