"""Plain-torch attention: the executable specification of the chunked attention op.

Layout (chosen once, the same as ``torch.nn.functional.scaled_dot_product_attention``):

* ``q``: ``[B, Hq, T, D]`` queries
* ``k``, ``v``: ``[B, Hkv, S, D]`` keys and values, ``Hq % Hkv == 0`` (grouped-query
  attention: query head ``h`` reads key/value head ``h // (Hq // Hkv)``)
* result: ``[B, Hq, T, D]``; log-sum-exp ``lse``: ``[B, Hq, T]``

Causal masking uses SDPA's ``is_causal`` convention, aligned at the top-left corner: query
``i`` sees keys ``j <= i`` (also when ``T != S``). Three variants (see README.md):

* sliding window ``window = w > 0`` (with ``causal``): query ``i`` sees keys ``i - w < j <= i``;
* logit soft-capping ``softcap = c > 0``: ``s = c · tanh(scale · q·k / c)`` (scale first, then
  cap, Gemma 2's order), before masking;
* attention sinks ``sinks`` ``[Hq]``: one extra logit per head in the softmax denominator,
  with no value; the returned ``lse`` includes it.

And documents (packed sequences): ``segment_ids`` ``[B, T]`` (integers, self-attention
``T == S``) keeps key ``j`` for query ``i`` only where ``segment_ids[b, i] == segment_ids[b, j]``,
ANDed with causal and the window. With ``key_segment_ids`` ``[B, S]`` the key side reads its
own ids: ``segment_ids[b, i] == key_segment_ids[b, j]`` (padding: query ids 0, key ids 0 for
real tokens and -1 for padded ones). A query row that then sees no key gives ``out = 0`` and
``lse = -inf`` (the sink with sinks), as SDPA does for a boolean mask row that is all False.

This module materialises the ``[B, Hq, T, S]`` score matrix on purpose: it is the ground
truth the memory-bounded implementations are tested against, not something to run at scale.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "attention_reference",
    "attention_reference_with_lse",
    "validate_qkv",
    "validate_variants",
    "validate_segment_ids",
    "accumulation_dtype",
]

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


def validate_variants(q: Tensor, causal: bool, window: int, softcap: float, sinks: Tensor | None, *, name: str) -> None:
    """Raise ``TypeError``/``ValueError`` for a bad ``window``, ``softcap`` or ``sinks``.

    ``window``: an int ``>= 0`` (0: no window); a window needs ``causal=True``. ``softcap``: a
    finite float ``>= 0`` (0: no cap). ``sinks``: None or a floating tensor ``[Hq]`` on ``q``'s
    device (any floating dtype; it is used in the accumulation dtype).
    """
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"{name}: window must be an int (0: no window), got {type(window).__name__}")
    if window < 0:
        raise ValueError(f"{name}: window must be >= 0 (0: no window), got {window}")
    if window > 0 and not causal:
        raise ValueError(f"{name}: a sliding window (window={window}) needs causal=True; pass causal=True or window=0")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{name}: softcap must be a float (0: no cap), got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"{name}: softcap must be a finite number >= 0 (0: no cap), got {softcap}")
    if sinks is not None:
        if not isinstance(sinks, Tensor):
            raise TypeError(f"{name}: sinks must be a Tensor [Hq] or None, got {type(sinks).__name__}")
        if not sinks.dtype.is_floating_point:
            raise TypeError(f"{name}: sinks must be a floating tensor, got dtype {sinks.dtype}")
        if tuple(sinks.shape) != (q.shape[1],):
            raise ValueError(f"{name}: sinks must have shape [Hq] = [{q.shape[1]}] (one logit per query head), got {tuple(sinks.shape)}")
        if sinks.device != q.device:
            raise ValueError(f"{name}: sinks must be on q's device {q.device}, got {sinks.device}")


def validate_segment_ids(q: Tensor, k: Tensor, segment_ids: Tensor | None, *, name: str,
                         key_segment_ids: Tensor | None = None) -> None:
    """Raise ``TypeError``/``ValueError`` for bad document ids (None is always fine).

    ``segment_ids``: an int32/int64 tensor ``[B, T]`` on ``q``'s device, for self-attention
    (``T == S``: a query's document is compared with its keys' at the same positions).
    ``key_segment_ids``: the keys' ids, same rules, ``[B, S]``; needs ``segment_ids``. With
    them ``S`` may differ from ``T`` (keys of their own, e.g. a K/V history's).
    """
    if key_segment_ids is not None and segment_ids is None:
        raise ValueError(f"{name}: key_segment_ids need segment_ids (the queries' ids they are compared with); "
                         "pass segment_ids too (e.g. zeros for a padding mask)")
    for arg, ids in (("segment_ids", segment_ids), ("key_segment_ids", key_segment_ids)):
        if ids is None:
            continue
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name}: {arg} must be a Tensor [B, T] of document ids or None, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: {arg} must be int32 or int64 document ids, got dtype {ids.dtype}")
        B, _, T, _ = q.shape
        if k.shape[2] != T and key_segment_ids is None:
            raise ValueError(
                f"{name}: {arg} need self-attention (as many keys as queries), got T = {T} queries and S = {k.shape[2]} keys; "
                "pass key_segment_ids [B, S] for keys of their own"
            )
        length = T if arg == "segment_ids" else k.shape[2]
        if tuple(ids.shape) != (B, length):
            raise ValueError(f"{name}: {arg} must have shape [B, {'T' if arg == 'segment_ids' else 'S'}] = [{B}, {length}], "
                             f"got {tuple(ids.shape)}")
        if ids.device != q.device:
            raise ValueError(f"{name}: {arg} must be on q's device {q.device}, got {ids.device}")


def same_document(segment_ids: Tensor, qs: int, qe: int, ks: int, ke: int, key_segment_ids: Tensor | None = None) -> Tensor:
    """``[B, qe - qs, ke - ks]`` boolean: query ``i``'s id equals key ``j``'s (the keys' ids
    are ``key_segment_ids`` when given, else ``segment_ids``)."""
    keys = segment_ids if key_segment_ids is None else key_segment_ids
    return segment_ids[:, qs:qe, None] == keys[:, None, ks:ke]


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
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    segment_ids: Tensor | None = None,
    key_segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Softmax attention and its row-wise log-sum-exp, in plain torch.

    Args:
        q: ``[B, Hq, T, D]``.
        k, v: ``[B, Hkv, S, D]`` with ``Hq % Hkv == 0``.
        causal: mask keys ``j > i`` for query ``i`` (SDPA's top-left convention).
        scale: multiplies ``q @ k^T``; default ``1 / sqrt(D)``.
        mask: optional boolean (``True`` = keep) or additive float mask broadcastable to
            ``[B, Hq, T, S]``; combined with ``causal`` when both are given.
        window: with ``causal``, query ``i`` sees only keys ``i - window < j <= i`` (0: all
            keys ``j <= i``).
        softcap: scores become ``softcap · tanh(s / softcap)`` after scaling, before any mask
            (0: no cap).
        sinks: optional ``[Hq]``: logit ``sinks[h]`` joins every row's softmax denominator of
            head ``h`` (a key with value 0; not soft-capped, never masked).
        segment_ids: optional int ``[B, T]`` document ids (needs ``T == S``): query ``i``
            sees key ``j`` only if ``segment_ids[b, i] == segment_ids[b, j]`` (ANDed with
            ``causal``, ``window`` and ``mask``).
        key_segment_ids: optional int ``[B, S]`` ids of the keys (needs ``segment_ids``):
            query ``i`` then sees key ``j`` only if ``segment_ids[b, i] == key_segment_ids[b, j]``.
    Returns:
        ``(out, lse)``: ``out`` ``[B, Hq, T, D]`` in the input dtype; ``lse`` ``[B, Hq, T]``,
        ``lse[b,h,i] = log(exp(sinks[h]) + Σ_j exp(s_ij + mask_ij))`` (no sink term without
        ``sinks``) in the accumulation dtype (float32 for 16/32-bit inputs, float64 for
        float64). Rows whose keys are all masked (or ``S = 0``) give ``out = 0`` and
        ``lse = -inf`` (``lse = sinks[h]`` with sinks); non-finite scores otherwise follow
        softmax (a row with a nan or ``+inf`` score, or with every visible score ``-inf``
        and no sink, is nan).

    Computation happens in the input dtype for ``float32``/``float64`` and in float32 for
    16-bit inputs (as SDPA's math backend does), so a float64 call is a float64 ground truth.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"attention_reference: causal must be a bool, got {type(causal).__name__}")
    validate_qkv(q, k, v, scale=scale, name="attention_reference")
    validate_variants(q, causal, window, softcap, sinks, name="attention_reference")
    validate_segment_ids(q, k, segment_ids, name="attention_reference", key_segment_ids=key_segment_ids)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    acc = accumulation_dtype(q.dtype)
    qa, ka, va = q.to(acc), _expand_kv(k, Hq // Hkv).to(acc), _expand_kv(v, Hq // Hkv).to(acc)
    scores = torch.matmul(qa, ka.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
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
        hidden = (j > i) | (j <= i - window) if window else j > i
        scores = scores.masked_fill(hidden, float("-inf"))
        visible = visible & ~hidden
    if segment_ids is not None:
        same = same_document(segment_ids, 0, T, 0, S, key_segment_ids).unsqueeze(1)
        scores = scores.masked_fill(~same, float("-inf"))
        visible = visible & same
    if sinks is None:
        lse = torch.logsumexp(scores, dim=-1)
    else:
        # The sink is one more column of the softmax; its probability multiplies no value.
        sink = sinks.to(acc).view(1, Hq, 1, 1).expand(B, Hq, T, 1)
        lse = torch.logsumexp(torch.cat([scores, sink], dim=-1), dim=-1)
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
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    segment_ids: Tensor | None = None,
    key_segment_ids: Tensor | None = None,
) -> Tensor:
    """Softmax attention ``softmax(scale · q k^T + mask) v`` in plain torch.

    Shapes: ``q`` ``[B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` → ``[B, Hq, T, D]``.
    See :func:`attention_reference_with_lse` for the argument details.
    """
    return attention_reference_with_lse(q, k, v, causal=causal, scale=scale, mask=mask, window=window, softcap=softcap,
                                        sinks=sinks, segment_ids=segment_ids, key_segment_ids=key_segment_ids)[0]
