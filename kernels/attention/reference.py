"""Plain-torch attention: the executable specification of the chunked attention op.

Layout (chosen once, the same as ``torch.nn.functional.scaled_dot_product_attention``):

* ``q``: ``[B, Hq, T, D]`` queries
* ``k``, ``v``: ``[B, Hkv, S, D]`` keys and values, ``Hq % Hkv == 0`` (grouped-query
  attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``)
* result: ``[B, Hq, T, D]``; log-sum-exp ``lse``: ``[B, Hq, T]``

Causal masking uses SDPA's ``is_causal`` convention, aligned at the top-left corner: query
``i`` sees keys ``j <= i`` (also when ``T != S``).

This module materialises the ``[B, Hq, T, S]`` score matrix on purpose: it is the ground
truth the memory-bounded implementations are tested against, not something to run at scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["attention_reference", "attention_reference_with_lse", "validate_qkv", "accumulation_dtype"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums are accumulated in: float64 stays float64, everything else uses float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def validate_qkv(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, name: str = "attention") -> None:
    """Raise ``TypeError``/``ValueError`` with a remedy when ``q, k, v`` do not fit the layout.

    Checks: tensors, floating dtypes shared by all three, one device, 4-D ``[B, H, len, D]``
    layout, matching batch and head dims, ``Hq % Hkv == 0``, ``k``/``v`` of equal shape, a
    finite ``scale`` when given (zero and negative scales are allowed: ``scale = 0`` makes
    every visible key equally likely). Empty sequences are allowed: ``T = 0`` gives an empty
    result, ``S = 0`` (no keys) gives ``out = 0`` and ``lse = -inf``, as softmax over an
    empty set followed by an empty matmul does in plain torch.
    """
    for arg_name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}: {arg_name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name}: {arg_name} has dtype {t.dtype}; use float16, bfloat16, float32 or float64")
        if t.dim() != 4:
            raise ValueError(
                f"{name}: {arg_name} must be 4-D [batch, heads, seq_len, head_dim] (SDPA layout), got shape "
                f"{tuple(t.shape)}; if your tensors are [B, T, H, D], call .transpose(1, 2) first"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{name}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{name}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{name}: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    B, Hq, _, D = q.shape
    Bk, Hkv, _, Dk = k.shape
    if B != Bk:
        raise ValueError(f"{name}: batch sizes differ: q has {B}, k/v have {Bk}")
    if D != Dk:
        raise ValueError(f"{name}: head dims differ: q has {D}, k/v have {Dk}")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(
            f"{name}: the number of query heads ({Hq}) must be a multiple of the number of key/value "
            f"heads ({Hkv}) for grouped-query attention"
        )
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"{name}: scale must be a Python float or None, got {type(scale).__name__}")
        if not math.isfinite(scale):
            raise ValueError(f"{name}: scale must be finite, got {scale}")


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    # The reference favours clarity over memory: materialise one copy of K/V per query head.
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_reference_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention and its row-wise log-sum-exp, in plain torch.

    Args:
        q: ``[B, Hq, T, D]``.
        k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0``.
        causal: mask keys ``j > i`` for query ``i`` (SDPA's top-left convention).
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        mask: optional boolean (``True`` = keep) or additive float mask broadcastable to
            ``[B, Hq, T, S]``; combined with ``causal`` when both are given.
    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, T, D]`` in the input dtype; ``lse`` ``[B, Hq, T]``,
        ``lse[b,h,i] = log Σ_j exp(scale · q_i·k_j + mask_ij)`` in the accumulation dtype
        (float32 for 16/32-bit inputs, float64 for float64). Rows whose keys are all masked
        (or ``S = 0``) give ``lse = -inf`` and ``out = 0``; non-finite scores otherwise follow
        softmax (a row with a nan or ``+inf`` score, or with every visible score ``-inf``,
        is nan).

    Computation happens in the input dtype for ``float32``/``float64`` and in float32 for
    16-bit inputs (as SDPA's math backend does), so a float64 call is a float64 ground truth.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"attention_reference: causal must be a bool, got {type(causal).__name__}")
    validate_qkv(q, k, v, scale=scale, name="attention_reference")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = accumulation_dtype(q.dtype)
    qa, ka, va = q.to(acc), _expand_kv(k, Hq // Hkv).to(acc), _expand_kv(v, Hq // Hkv).to(acc)
    scores = torch.matmul(qa, ka.transpose(-1, -2)) * scale
    # Which (query, key) pairs the masks leave visible: a row with none is structurally empty.
    visible = torch.ones((T, S), dtype=torch.bool, device=q.device)
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError(f"attention_reference: mask must be a Tensor or None, got {type(mask).__name__}")
        try:
            torch.broadcast_shapes(mask.shape, (B, Hq, T, S))
        except RuntimeError as e:
            raise ValueError(
                f"attention_reference: mask of shape {tuple(mask.shape)} does not broadcast to [B, Hq, T, S] = "
                f"{[B, Hq, T, S]}"
            ) from e
        if mask.dtype == torch.bool:
            keep = mask.to(scores.device)
            scores = scores.masked_fill(~keep, float("-inf"))
        elif mask.dtype.is_floating_point:
            add = mask.to(device=scores.device, dtype=acc)
            scores = scores + add
            keep = add != float("-inf")
        else:
            raise TypeError(f"attention_reference: mask must be bool or floating, got {mask.dtype}")
        visible = visible & keep
    if causal:
        i = torch.arange(T, device=q.device).unsqueeze(1)
        j = torch.arange(S, device=q.device).unsqueeze(0)
        scores = scores.masked_fill(j > i, float("-inf"))
        visible = visible & (j <= i)
    lse = torch.logsumexp(scores, dim=-1)
    # A row with no visible key has lse = -inf; subtracting 0 instead keeps exp() at 0 rather
    # than nan, so it gives out = 0. A row whose visible scores are all -inf because of the
    # data (not the masks) keeps softmax's nan, as plain torch gives.
    empty = ~visible.any(dim=-1)
    safe_lse = torch.where(empty, torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))
    out = torch.matmul(probs, va)
    return out.to(q.dtype), lse


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Softmax attention ``softmax(scale · q k^T + mask) v`` in plain torch.

    Shapes: ``q`` ``[B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` → ``[B, Hq, T, D]``.
    See :func:`attention_reference_with_lse` for the argument details.
    """
    return attention_reference_with_lse(q, k, v, causal=causal, scale=scale, mask=mask)[0]
