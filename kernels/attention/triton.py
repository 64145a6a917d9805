"""Triton kernels for chunked attention, and the launchers the op uses on CUDA tensors.

Kernels (one (query chunk, key chunk) pair per launch; the Python launchers run the chunk
loops, exactly as :mod:`.chunked` does, so the memory bound is the same):

* :func:`_fwd_pair_kernel` — partial attention of a query chunk over a key chunk, merged
  in place into a running fp32 ``(out, lse)`` of the query chunk (online softmax; the
  running state re-enters as ``m = lse, l = 1, acc = out``, which is exact because
  ``Σ_j exp(s_ij − lse_i) = 1``).
* :func:`_bwd_dkdv_kernel` — for a key block, loops over the query heads of its GQA group
  and the query rows of the chunk; adds ``dk``/``dv`` into fp32 chunk accumulators.
* :func:`_bwd_dq_kernel` — for a query block, loops over the key rows of the chunk; adds
  ``dq`` into an fp32 accumulator.

Every output tile is owned by exactly one program, so no atomics are needed (bf16 atomics
fail under the interpreter, and determinism is a bonus). GQA maps query head ``h`` to key
head ``h // G`` by index arithmetic: K/V are never repeated. Head dims up to 256 are handled
with a padded ``BLOCK_D = next_power_of_2(D)`` and masked loads. ``fp32`` inputs use IEEE
fp32 dots (no TF32), so fp32 results keep fp32 accuracy; fp16/bf16 inputs feed the tensor
cores and accumulate in fp32.

Causal masking uses absolute positions (``q_pos0``/``k_pos0`` of the chunks), SDPA's
top-left convention: query ``i`` sees keys ``j <= i``; a sliding window ``w`` keeps
``i - w < j <= i``. The launchers skip chunk pairs outside that band (``chunked.chunk_schedule``)
and every kernel's inner loop runs only over the blocks of a pair that meet the band. Scores
of a tile (scale, soft-cap, band mask) come from one helper, :func:`_tile_scores`, shared by
the three kernels. Attention sinks live in the launchers: the forward folds the sink into
each query chunk's fp32 result (``chunked.fold_sinks``), the kernels then see the
sink-inclusive ``lse`` only, and ``dsinks`` is a row reduction (``chunked.sink_grad``).

Documents (packed sequences): the launchers classify chunk pairs with ``chunked.Documents``
in the one schedule: pairs whose chunks share no document are never launched, pairs inside
one document launch without ids (``DOCUMENTS`` off), the others get the ``[B, T]`` ids
pointer and ``_tile_scores`` ANDs ``seg_i == seg_j`` into the tile's keep-mask (ids read at
absolute positions ``q_pos``/``k_pos``, like the band). The keys read their ids through a
second pointer (``KSEG``): ``key_segment_ids`` when given (padding), else the same ids. Rows
that see no key need nothing new: the forward kernel already writes ``out = 0``,
``lse = -inf`` for a row whose every score is masked (``l = 0``), as for a window's rows past
the last key, and the backward kernels zero ``P`` wherever the keep-mask is False, so such
rows get ``dq = 0`` and add nothing to ``dk``/``dv``.

Testing on CPU: set ``TRITON_INTERPRET=1`` *before* triton is imported (``triton.jit``
decides at decoration time whether to build an interpreted function); the launchers accept
CPU tensors in that mode.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

import triton
import triton.language as tl

from .chunked import Documents, chunk_schedule, fold_sinks, sink_grad
from .reference import validate_qkv, validate_segment_ids, validate_variants

__all__ = ["triton_attention_forward", "triton_attention_backward", "interpreting", "pair_segment_ids"]


def interpreting() -> bool:
    """True when triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _tanh(x):
    # tanh to fp32 round-off from exp alone (the interpreter has no libdevice): Cephes'
    # tanhf. Near 0 an odd polynomial (1 − 2/(e^{2x}+1) would cancel there); elsewhere that
    # formula, whose result is >= 0.55 in size, so nothing cancels; e^{2|x|} = inf gives ±1.
    a = tl.abs(x)
    big = 1.0 - 2.0 / (tl.exp(2.0 * a) + 1.0)
    big = tl.where(x < 0, -big, big)
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    return tl.where(a >= 0.625, big, small)


@triton.jit
def _load_ids(SEG, b, pos, ok, ssb, sst, DOCUMENTS: tl.constexpr):
    """Document ids of batch row ``b`` at absolute positions ``pos`` (``DOCUMENTS``; without,
    ``pos`` itself: a placeholder :func:`_tile_scores` never reads)."""
    ids = pos
    if DOCUMENTS:
        ids = tl.load(SEG + b * ssb + pos * sst, mask=ok, other=0)
    return ids


@triton.jit
def _tile_scores(q, k, q_pos, k_pos, q_ids, k_ids, keep, scale, window, softcap,
                 CAUSAL: tl.constexpr, BANDED: tl.constexpr, CAPPED: tl.constexpr, DOCUMENTS: tl.constexpr,
                 PRECISION: tl.constexpr):
    """Scores of a ``[M, N]`` tile: ``(s, keep, t)``.

    ``s = scale·q·kᵀ``, capped to ``softcap·tanh(s / softcap)`` when ``CAPPED`` (``t`` is that
    tanh, for the backward's ``1 − t²``; ``s`` itself otherwise); ``keep`` (in: the bounds
    mask) narrowed to ``k_pos <= q_pos`` (``CAUSAL``), ``k_pos > q_pos − window``
    (``BANDED``) and ``q_ids == k_ids`` (``DOCUMENTS``). Masked entries of ``s`` are left to
    the caller.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    t = s
    if CAPPED:
        t = _tanh(s / softcap)
        s = softcap * t
    if CAUSAL:
        keep = keep & (k_pos[None, :] <= q_pos[:, None])
    if BANDED:
        keep = keep & (k_pos[None, :] > q_pos[:, None] - window)
    if DOCUMENTS:
        keep = keep & (k_ids[None, :] == q_ids[:, None])
    return s, keep, t


@triton.jit
def _key_range(q_first, q_last, k_pos0, Sc, window,
               CAUSAL: tl.constexpr, BANDED: tl.constexpr, BLOCK_N: tl.constexpr):
    """Chunk-relative key rows ``[lo, hi)`` a query block (absolute ``q_first..q_last``) can see;
    ``lo`` rounded down to a key block."""
    lo = 0
    hi = Sc
    if CAUSAL:
        # Keys right of the block's last query are all masked: stop the loop there.
        hi = tl.minimum(Sc, q_last + 1 - k_pos0)
    if BANDED:
        # Keys window or more left of the block's first query too: start it there.
        lo = tl.maximum(0, q_first - window + 1 - k_pos0)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _fwd_pair_kernel(
    Q, K, V, O, L, SEG, KSEG,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sob, soh, sot, sod,
    slb, slh, slt,
    ssb, sst, sksb, skst,
    Tc, Sc, D, H, G, q_pos0, k_pos0, scale, window, softcap,
    CAUSAL: tl.constexpr, BANDED: tl.constexpr, CAPPED: tl.constexpr, DOCUMENTS: tl.constexpr, HAS_PREV: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tc
    d_ok = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q_ids = _load_ids(SEG, b, q_pos0 + offs_m, m_ok, ssb, sst, DOCUMENTS)
    o_ptrs = O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :] * sod
    l_ptrs = L + b * slb + h * slh + offs_m * slt
    if HAS_PREV:
        # Re-enter the online softmax from the normalised running result: m = lse, l = 1.
        m_i = tl.load(l_ptrs, mask=m_ok, other=float("-inf"))
        l_i = tl.where(m_i == float("-inf"), 0.0, 1.0)
        acc = tl.load(o_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(q_pos0 + pid_m * BLOCK_M, q_pos0 + (pid_m + 1) * BLOCK_M - 1, k_pos0, Sc, window,
                        CAUSAL, BANDED, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < Sc
        k = tl.load(K + b * skb + hk * skh + n[:, None] * sks + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + hk * svh + n[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k_ids = _load_ids(KSEG, b, k_pos0 + n, n_ok, sksb, skst, DOCUMENTS)
        s, keep, _ = _tile_scores(q, k, q_pos0 + offs_m, k_pos0 + n, q_ids, k_ids, n_ok[None, :], scale, window, softcap,
                                  CAUSAL, BANDED, CAPPED, DOCUMENTS, PRECISION)
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing visible yet keep m = -inf; shifting by 0 keeps exp() at 0, not nan.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(o_ptrs, out, mask=m_ok[:, None] & d_ok[None, :])
    tl.store(l_ptrs, lse, mask=m_ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, L, DELTA, DK, DV, SEG, KSEG,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdot, sdod,
    slb, slh, slt,
    sdkb, sdkh, sdks, sdkd,
    ssb, sst, sksb, skst,
    Tc, Sc, D, HKV, G, q_pos0, k_pos0, scale, window, softcap,
    CAUSAL: tl.constexpr, BANDED: tl.constexpr, CAPPED: tl.constexpr, DOCUMENTS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # L and DELTA share strides (both [B, Hq, T] fp32); DK and DV too ([B, Hkv, Sc, D] fp32).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // HKV
    hk = pid_bh % HKV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < Sc
    d_ok = offs_d < D
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * sks + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svs + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    k_ids = _load_ids(KSEG, b, k_pos0 + offs_n, n_ok, sksb, skst, DOCUMENTS)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    hi = Tc
    if CAUSAL:
        # Queries before the block's first key see none of it: start the row loop there.
        lo = tl.maximum(0, k_pos0 + pid_n * BLOCK_N - q_pos0)
        lo = (lo // BLOCK_M) * BLOCK_M
    if BANDED:
        # Queries window or more right of the block's last key see none of it: stop there.
        hi = tl.minimum(Tc, k_pos0 + (pid_n + 1) * BLOCK_N - 1 + window - q_pos0)
    for g in range(0, G):
        h = hk * G + g
        for start_m in range(lo, hi, BLOCK_M):
            m = start_m + offs_m
            m_ok = m < Tc
            q = tl.load(Q + b * sqb + h * sqh + m[:, None] * sqt + offs_d[None, :] * sqd,
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(DO + b * sdob + h * sdoh + m[:, None] * sdot + offs_d[None, :] * sdod,
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(L + b * slb + h * slh + m * slt, mask=m_ok, other=0.0)
            delta = tl.load(DELTA + b * slb + h * slh + m * slt, mask=m_ok, other=0.0)
            q_ids = _load_ids(SEG, b, q_pos0 + m, m_ok, ssb, sst, DOCUMENTS)
            s, keep, t = _tile_scores(q, k, q_pos0 + m, k_pos0 + offs_n, q_ids, k_ids, m_ok[:, None] & n_ok[None, :], scale,
                                      window, softcap, CAUSAL, BANDED, CAPPED, DOCUMENTS, PRECISION)
            p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if CAPPED:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    dk_ptrs = DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd
    dv_ptrs = DV + b * sdkb + hk * sdkh + offs_n[:, None] * sdks + offs_d[None, :] * sdkd
    # This program owns its tile of the chunk accumulators: read-add-write without atomics.
    tl.store(dk_ptrs, tl.load(dk_ptrs, mask=kv_mask, other=0.0) + dk * scale, mask=kv_mask)
    tl.store(dv_ptrs, tl.load(dv_ptrs, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, L, DELTA, DQ, SEG, KSEG,
    sqb, sqh, sqt, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    sdob, sdoh, sdot, sdod,
    slb, slh, slt,
    sdqb, sdqh, sdqt, sdqd,
    ssb, sst, sksb, skst,
    Tc, Sc, D, H, G, q_pos0, k_pos0, scale, window, softcap,
    CAUSAL: tl.constexpr, BANDED: tl.constexpr, CAPPED: tl.constexpr, DOCUMENTS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // G
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tc
    d_ok = offs_d < D
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :] * sdod, mask=q_mask, other=0.0)
    lse = tl.load(L + b * slb + h * slh + offs_m * slt, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + b * slb + h * slh + offs_m * slt, mask=m_ok, other=0.0)
    q_ids = _load_ids(SEG, b, q_pos0 + offs_m, m_ok, ssb, sst, DOCUMENTS)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, hi = _key_range(q_pos0 + pid_m * BLOCK_M, q_pos0 + (pid_m + 1) * BLOCK_M - 1, k_pos0, Sc, window,
                        CAUSAL, BANDED, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        n = start_n + offs_n
        n_ok = n < Sc
        k = tl.load(K + b * skb + hk * skh + n[:, None] * sks + offs_d[None, :] * skd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(V + b * svb + hk * svh + n[:, None] * svs + offs_d[None, :] * svd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        k_ids = _load_ids(KSEG, b, k_pos0 + n, n_ok, sksb, skst, DOCUMENTS)
        s, keep, t = _tile_scores(q, k, q_pos0 + offs_m, k_pos0 + n, q_ids, k_ids, m_ok[:, None] & n_ok[None, :], scale,
                                  window, softcap, CAUSAL, BANDED, CAPPED, DOCUMENTS, PRECISION)
        p = tl.where(keep, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        if CAPPED:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_ptrs = DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :] * sdqd
    tl.store(dq_ptrs, tl.load(dq_ptrs, mask=q_mask, other=0.0) + dq * scale, mask=q_mask)


def _blocks(D: int, dtype: torch.dtype) -> tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_N, BLOCK_D)``: tiles shrink as the head dim grows to bound registers."""
    block_d = max(16, triton.next_power_of_2(D))
    if block_d > 256:
        raise ValueError(f"triton attention: head dim {D} > 256 is not supported; use the chunked torch path")
    if interpreting():
        return 16, 16, block_d
    if block_d <= 64:
        return 64, 64, block_d
    if block_d <= 128:
        return (64, 64, block_d) if dtype != torch.float32 else (32, 32, block_d)
    return 32, 32, block_d


def _precision(dtype: torch.dtype) -> str:
    # TF32 would cost fp32 inputs ~3 decimal digits; 16-bit inputs ignore this setting.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, chunk_size: int, name: str,
           window: int, softcap: float, sinks: Tensor | None, segment_ids: Tensor | None,
           key_segment_ids: Tensor | None = None) -> float:
    validate_qkv(q, k, v, scale=scale, name=name)
    if q.dtype == torch.float64:
        raise TypeError(f"{name}: float64 is not supported by the Triton kernels; use the chunked torch path")
    if not (q.is_cuda or interpreting()):
        raise ValueError(f"{name}: expects CUDA tensors (or TRITON_INTERPRET=1 for CPU testing), got {q.device}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be a positive int, got {chunk_size!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    validate_variants(q, causal, window, softcap, sinks, name=name)
    validate_segment_ids(q, k, segment_ids, name=name, key_segment_ids=key_segment_ids)
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _variant_args(window: int, softcap: float, segment_ids: Tensor | None,
                  key_segment_ids: Tensor | None = None) -> tuple[tuple, tuple, tuple, dict]:
    """The kernels' variant arguments: the two ids pointers (``SEG, KSEG``; the keys' is the
    queries' without ``key_segment_ids``; None without ids), their strides
    (``ssb, sst, sksb, skst``; 0 without ids), the runtime ``(window, softcap)``, and the
    constexprs ``BANDED``, ``CAPPED``, ``DOCUMENTS``."""
    if segment_ids is None:
        ptrs, strides = (None, None), (0, 0, 0, 0)
    else:
        keys = segment_ids if key_segment_ids is None else key_segment_ids
        ptrs, strides = (segment_ids, keys), (*segment_ids.stride(), *keys.stride())
    # softcap = 0 is never divided by: CAPPED is off then (1.0 keeps the argument a float).
    flags = dict(BANDED=window > 0, CAPPED=softcap > 0, DOCUMENTS=segment_ids is not None)
    return ptrs, strides, (window, float(softcap) or 1.0), flags


def pair_segment_ids(documents: Documents | None, qs: int, ks: int) -> dict:
    """The ids a chunk pair's launch needs, as the launchers' keywords ``segment_ids`` and
    ``key_segment_ids``: both None when documents mask nothing in it (no documents, or one
    document per row across both chunks), the ``[B, T]`` ids otherwise (the keys' None
    without ``key_segment_ids``)."""
    if documents is None or documents.one_document(qs, ks):
        return dict(segment_ids=None, key_segment_ids=None)
    return dict(segment_ids=documents.segment_ids, key_segment_ids=documents.key_segment_ids)


def launch_fwd_pair(qc: Tensor, kc: Tensor, vc: Tensor, o_acc: Tensor, lse_acc: Tensor, *, q_pos0: int, k_pos0: int,
                    causal: bool, scale: float, has_prev: bool, window: int = 0, softcap: float = 0.0,
                    segment_ids: Tensor | None = None, key_segment_ids: Tensor | None = None) -> None:
    """Merge attention of ``qc`` over ``kc``/``vc`` into the running fp32 ``o_acc``/``lse_acc``.

    ``qc`` ``[B, Hq, Tc, D]``, ``kc``/``vc`` ``[B, Hkv, Sc, D]`` (any strides),
    ``o_acc`` ``[B, Hq, Tc, D]`` fp32, ``lse_acc`` ``[B, Hq, Tc]`` fp32 (written; read too
    when ``has_prev``). ``q_pos0``/``k_pos0``: absolute positions of the chunks' first rows.
    ``window``/``softcap``: the band (with ``causal``) and the soft-cap, 0 for none.
    ``segment_ids``: the whole ``[B, T]`` document ids (read at absolute positions), or None
    when the pair needs no document mask; ``key_segment_ids``: the keys' ``[B, S]`` ids (None:
    ``segment_ids``).
    """
    B, H, Tc, D = qc.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    bm, bn, bd = _blocks(D, qc.dtype)
    grid = (triton.cdiv(Tc, bm), B * H)
    ids, id_strides, args, flags = _variant_args(window, softcap, segment_ids, key_segment_ids)
    _fwd_pair_kernel[grid](
        qc, kc, vc, o_acc, lse_acc, *ids,
        *qc.stride(), *kc.stride(), *vc.stride(), *o_acc.stride(), *lse_acc.stride(), *id_strides,
        Tc, Sc, D, H, H // Hkv, q_pos0, k_pos0, scale, *args,
        CAUSAL=causal, HAS_PREV=has_prev, PRECISION=_precision(qc.dtype), **flags,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd,
    )


def launch_bwd_pair(qc: Tensor, kc: Tensor, vc: Tensor, doc: Tensor, lsec: Tensor, deltac: Tensor,
                    dq_acc: Tensor, dk_acc: Tensor, dv_acc: Tensor, *, q_pos0: int, k_pos0: int,
                    causal: bool, scale: float, window: int = 0, softcap: float = 0.0,
                    segment_ids: Tensor | None = None, key_segment_ids: Tensor | None = None) -> None:
    """Add one chunk pair's contributions to the fp32 accumulators ``dq_acc`` (``[B, Hq, Tc, D]``),
    ``dk_acc``/``dv_acc`` (``[B, Hkv, Sc, D]``, same strides). ``lsec``/``deltac``: ``[B, Hq, Tc]``
    fp32 with equal strides (``lsec`` sink-inclusive when sinks are used). ``segment_ids`` and
    ``key_segment_ids`` as in :func:`launch_fwd_pair`."""
    B, H, Tc, D = qc.shape
    Hkv, Sc = kc.shape[1], kc.shape[2]
    if lsec.stride() != deltac.stride() or dk_acc.stride() != dv_acc.stride():
        raise ValueError("launch_bwd_pair: lse/delta and dk/dv accumulators must share strides")
    bm, bn, bd = _blocks(D, qc.dtype)
    prec = _precision(qc.dtype)
    ids, id_strides, args, flags = _variant_args(window, softcap, segment_ids, key_segment_ids)
    _bwd_dkdv_kernel[(triton.cdiv(Sc, bn), B * Hkv)](
        qc, kc, vc, doc, lsec, deltac, dk_acc, dv_acc, *ids,
        *qc.stride(), *kc.stride(), *vc.stride(), *doc.stride(), *lsec.stride(), *dk_acc.stride(), *id_strides,
        Tc, Sc, D, Hkv, H // Hkv, q_pos0, k_pos0, scale, *args,
        CAUSAL=causal, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **flags,
    )
    _bwd_dq_kernel[(triton.cdiv(Tc, bm), B * H)](
        qc, kc, vc, doc, lsec, deltac, dq_acc, *ids,
        *qc.stride(), *kc.stride(), *vc.stride(), *doc.stride(), *lsec.stride(), *dq_acc.stride(), *id_strides,
        Tc, Sc, D, H, H // Hkv, q_pos0, k_pos0, scale, *args,
        CAUSAL=causal, PRECISION=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, **flags,
    )


def triton_attention_forward(q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float | None,
                             chunk_size: int, window: int = 0, softcap: float = 0.0,
                             sinks: Tensor | None = None, segment_ids: Tensor | None = None,
                             key_segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Same contract as :func:`.chunked.chunked_attention_forward`, with Triton pair kernels.

    ``q`` ``[B, Hq, T, D]``, ``k``/``v`` ``[B, Hkv, S, D]`` (fp16/bf16/fp32, CUDA) →
    ``out`` ``[B, Hq, T, D]`` (input dtype), ``lse`` ``[B, Hq, T]`` (fp32, sink-inclusive
    with ``sinks [Hq]``). Pairs outside a window's band, or whose chunks share no document
    (``segment_ids`` ``[B, T]``; the keys' ids ``key_segment_ids`` ``[B, S]`` when given), are
    never launched; rows that see no key give ``out = 0``, ``lse = -inf`` (the sink with sinks).
    """
    scale = _check(q, k, v, causal, scale, chunk_size, "triton_attention_forward", window, softcap, sinks, segment_ids,
                   key_segment_ids)
    B, Hq, T, D = q.shape
    S = k.shape[2]
    # q's layout, as the op's fake implementation promises (chunked.out_like).
    out = torch.empty_like(q, memory_format=torch.preserve_format)
    lse = torch.empty((B, Hq, T), dtype=torch.float32, device=q.device)
    documents = Documents.of(segment_ids, chunk_size, key_segment_ids)
    for (qs, qe), key_chunks in chunk_schedule(T, S, chunk_size, causal, window=window, documents=documents):
        # With no key chunk (a window's rows past the last key, or key ids that leave the
        # chunk's rows no key): out = 0, lse = -inf.
        o_acc = torch.zeros((B, Hq, qe - qs, D), dtype=torch.float32, device=q.device)
        lse_acc = lse[:, :, qs:qe].fill_(float("-inf"))
        for idx, (ks, ke) in enumerate(key_chunks):
            launch_fwd_pair(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], o_acc, lse_acc, q_pos0=qs, k_pos0=ks,
                            causal=causal, scale=scale, has_prev=idx > 0, window=window, softcap=softcap,
                            **pair_segment_ids(documents, qs, ks))
        if sinks is not None:
            # In fp32, before out's single rounding.
            o_acc, lse[:, :, qs:qe] = fold_sinks(o_acc, lse_acc, sinks)
        out[:, :, qs:qe] = o_acc
    return out, lse


def attention_delta(dout: Tensor, out: Tensor, dlse: Tensor | None, chunk_size: int) -> Tensor:
    """``delta = rowsum(dout · out) − dlse`` in fp32, ``[B, Hq, T]``, computed chunk by chunk."""
    B, Hq, T, _ = out.shape
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=out.device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        delta[:, :, s:e] = (dout[:, :, s:e].float() * out[:, :, s:e].float()).sum(-1)
    if dlse is not None:
        delta -= dlse.float()
    return delta


def triton_attention_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, *,
                              causal: bool, scale: float | None, chunk_size: int,
                              dlse: Tensor | None = None, window: int = 0, softcap: float = 0.0,
                              sinks: Tensor | None = None, segment_ids: Tensor | None = None,
                              key_segment_ids: Tensor | None = None) -> tuple[Tensor, ...]:
    """Same contract as :func:`.chunked.chunked_attention_backward`, with Triton pair kernels.

    Outer loop over key chunks (their ``dk``/``dv`` are final after it), inner loop over the
    query chunks that see them (pairs outside a window's band, or whose chunks share no
    document, are never launched); ``dq``
    accumulates in fp32 over the whole sequence. Returns ``(dq, dk, dv)``, and ``dsinks``
    ``[Hq]`` fourth when ``sinks`` is given.
    """
    scale = _check(q, k, v, causal, scale, chunk_size, "triton_attention_backward", window, softcap, sinks, segment_ids,
                   key_segment_ids)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    lse = lse.float()
    delta = attention_delta(dout, out, dlse, chunk_size)
    if delta.stride() != lse.stride():
        lse = lse.contiguous()
    dq_acc = torch.zeros((B, Hq, T, D), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, Hkv, S, D), dtype=k.dtype, device=k.device)
    dv = torch.empty((B, Hkv, S, D), dtype=v.dtype, device=v.device)
    documents = Documents.of(segment_ids, chunk_size, key_segment_ids)
    for (ks, ke), query_chunks in chunk_schedule(T, S, chunk_size, causal, kv_outer=True, window=window, documents=documents):
        dk_acc = torch.zeros((B, Hkv, ke - ks, D), dtype=torch.float32, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        for qs, qe in query_chunks:
            launch_bwd_pair(q[:, :, qs:qe], k[:, :, ks:ke], v[:, :, ks:ke], dout[:, :, qs:qe],
                            lse[:, :, qs:qe], delta[:, :, qs:qe], dq_acc[:, :, qs:qe], dk_acc, dv_acc,
                            q_pos0=qs, k_pos0=ks, causal=causal, scale=scale, window=window, softcap=softcap,
                            **pair_segment_ids(documents, qs, ks))
        dk[:, :, ks:ke] = dk_acc
        dv[:, :, ks:ke] = dv_acc
    grads = (dq_acc.to(q.dtype), dk, dv)
    return grads if sinks is None else (*grads, sink_grad(lse, delta, sinks))
