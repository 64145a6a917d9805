"""Memory-bounded exact attention in plain torch: chunk loops with an online-softmax merge.

This is the CPU path of the ``longctx::chunked_attention_*`` ops and the structure the
Triton launchers follow on CUDA. Shapes (SDPA layout, see ``reference.py``):

* ``q``: ``[B, Hq, T, D]``; ``k``, ``v``: ``[B, Hkv, S, D]``; ``G = Hq // Hkv``
* ``out``: ``[B, Hq, T, D]`` (input dtype); ``lse``: ``[B, Hq, T]`` (accumulation dtype)

Memory: the largest temporary is one score block ``[B, Hkv, G·Cq, Ck]`` for a query chunk of
``Cq`` rows and a key/value chunk of ``Ck`` columns (both ``chunk_size``), never ``[T, S]``.
Grouped-query attention never copies K/V per query head: the ``G`` query heads that share a
K/V head are stacked along the row axis (``[B, Hkv, G·Cq, D]``), so one batched matmul per
chunk pair serves the whole group, and the gradient of K/V is summed over the group by that
same matmul.

Causal masking follows SDPA's top-left convention (query ``i`` sees keys ``j <= i``), for any
``T`` and ``S``. Chunk pairs whose keys all lie to the right of every query in the chunk are
skipped. Because key chunk 0 is visible to every query, every row has a finite ``lse`` after
the first key chunk; later chunks may still be fully masked for some rows (``lse_part = -inf``),
which the merge handles.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import accumulation_dtype, validate_qkv

__all__ = ["chunked_attention_forward", "chunked_attention_backward", "chunk_schedule", "merge_partial", "check_arguments"]


def check_arguments(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, chunk_size: int, name: str) -> float:
    """Validate the arguments shared by every chunked-attention entry point; return the scale."""
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise TypeError(f"{name}: chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"{name}: chunk_size must be >= 1, got {chunk_size}")
    validate_qkv(q, k, v, scale=scale, name=name)
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def chunk_schedule(T: int, S: int, chunk_size: int, causal: bool, *, kv_outer: bool = False):
    """The chunk pairs that carry work, grouped by the outer chunk.

    Yields ``((os, oe), [(is, ie), ...])``: an outer chunk and the inner chunks paired with it,
    in order. Forward order is query-outer/key-inner (``kv_outer=False``); backward order is
    key-outer/query-inner, so a key chunk's ``dk``/``dv`` are final after its inner loop. A
    causal pair is skipped when its first key ``ks`` is right of its last query ``qe - 1``
    (every score of the pair is masked).
    """
    q_chunks = [(s, min(s + chunk_size, T)) for s in range(0, T, chunk_size)]
    k_chunks = [(s, min(s + chunk_size, S)) for s in range(0, S, chunk_size)]
    if kv_outer:
        for ks, ke in k_chunks:
            yield (ks, ke), [(qs, qe) for qs, qe in q_chunks if not (causal and ks > qe - 1)]
    else:
        for qs, qe in q_chunks:
            yield (qs, qe), [(ks, ke) for ks, ke in k_chunks if not (causal and ks > qe - 1)]


def _group_rows(x: Tensor, qs: int, qe: int, hkv: int, dtype: torch.dtype) -> Tensor:
    """Query-side chunk ``x[:, :, qs:qe]`` (``[B, Hq, Cq, ...]``) as ``[B, Hkv, G·Cq, ...]``.

    Row ``r`` of the result is query head ``kv·G + r // Cq``, position ``qs + r % Cq``.
    """
    c = x[:, :, qs:qe].to(dtype)
    B, Hq = c.shape[:2]
    return c.reshape(B, hkv, (Hq // hkv) * (qe - qs), *c.shape[3:])


def _ungroup_rows(x: Tensor, hq: int, cq: int) -> Tensor:
    """Inverse of :func:`_group_rows`: ``[B, Hkv, G·Cq, ...]`` → ``[B, Hq, Cq, ...]``."""
    return x.reshape(x.shape[0], hq, cq, *x.shape[3:])


def _causal_keep(qs: int, qe: int, ks: int, ke: int, groups: int, device) -> Tensor | None:
    """Boolean keep-mask ``[G·Cq, Ck]`` for a chunk pair, or None when nothing is masked."""
    if ke - 1 <= qs:
        # Every key of the chunk is at or left of the first query: the pair is fully visible.
        return None
    qpos = torch.arange(qs, qe, device=device).repeat(groups).unsqueeze(1)
    kpos = torch.arange(ks, ke, device=device).unsqueeze(0)
    return kpos <= qpos


def merge_partial(out: Tensor, lse: Tensor, out_part: Tensor, lse_part: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two normalised partial softmax results over disjoint key sets (in place on ``out``).

    With ``LSE`` finite (``lse_part`` may be ``-inf``):
    ``out ← out − σ(lse_part − LSE)·(out − out_part)``,
    ``LSE ← LSE − logsigmoid(LSE − lse_part)``; this never exponentiates a positive number.
    """
    w = torch.sigmoid(lse_part - lse).unsqueeze(-1)
    out.sub_(w * (out - out_part))
    return out, lse - torch.nn.functional.logsigmoid(lse - lse_part)


def _partial_attention(qc: Tensor, kc: Tensor, vc: Tensor, scale: float, keep: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax attention of a query block over one key block: ``(out_part, lse_part)``.

    ``qc`` ``[B, Hkv, R, D]``, ``kc``/``vc`` ``[B, Hkv, Ck, D]`` → ``[B, Hkv, R, D]``, ``[B, Hkv, R]``.
    Rows with every key masked give ``lse_part = -inf`` and ``out_part = 0``.
    """
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)
    if keep is not None:
        s.masked_fill_(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    # A fully masked row has m = -inf; shifting by 0 instead makes its exp() 0, not nan.
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp_(s.sub_(m))
    denom = p.sum(dim=-1, keepdim=True)
    out_part = torch.matmul(p, vc).div_(denom.clamp_min(torch.finfo(denom.dtype).tiny))
    lse_part = (m + torch.log(denom)).squeeze(-1)
    return out_part, lse_part


def chunked_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Exact attention, one (query chunk, key chunk) pair at a time.

    Args:
        q: ``[B, Hq, T, D]``; any ``T >= 0`` (not only multiples of ``chunk_size``).
        k, v: ``[B, Hkv, S, D]``, ``Hq % Hkv == 0``, ``S >= 1``.
        causal: SDPA's top-left causal mask (query ``i`` sees keys ``j <= i``).
        scale: score scale; ``None`` means ``1 / sqrt(D)``.
        chunk_size: rows of a query chunk and columns of a key chunk.
    Returns:
        ``out`` ``[B, Hq, T, D]`` in the input dtype and ``lse`` ``[B, Hq, T]`` in the
        accumulation dtype (float32 for 16/32-bit inputs, float64 for float64).
    """
    scale = check_arguments(q, k, v, causal, scale, chunk_size, "chunked_attention_forward")
    if _cpu_kernel_applies(q, k, causal):
        return _forward_cpu_kernel(q, k, v, causal, scale, chunk_size)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T), dtype=acc, device=q.device)
    for (qs, qe), key_chunks in chunk_schedule(T, S, chunk_size, causal):
        qc = _group_rows(q, qs, qe, Hkv, acc)
        o_acc = lse_acc = None
        for ks, ke in key_chunks:
            kc = k[:, :, ks:ke].to(acc)
            vc = v[:, :, ks:ke].to(acc)
            keep = _causal_keep(qs, qe, ks, ke, G, q.device) if causal else None
            o_part, l_part = _partial_attention(qc, kc, vc, scale, keep)
            if o_acc is None:
                # Key chunk 0 is visible to every query, so after it every row's lse is finite.
                o_acc, lse_acc = o_part, l_part
            else:
                o_acc, lse_acc = merge_partial(o_acc, lse_acc, o_part, l_part)
        out[:, :, qs:qe] = _ungroup_rows(o_acc, Hq, qe - qs)
        lse[:, :, qs:qe] = _ungroup_rows(lse_acc, Hq, qe - qs)
    return out, lse


def _delta(dout: Tensor, out: Tensor, dlse: Tensor | None, chunk_size: int, acc: torch.dtype) -> Tensor:
    """``delta[b,h,i] = Σ_d dout·out − dlse``, chunk by chunk (no ``[B, Hq, T, D]`` fp32 temporary)."""
    B, Hq, T, _ = out.shape
    delta = torch.empty((B, Hq, T), dtype=acc, device=out.device)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        delta[:, :, s:e] = (dout[:, :, s:e].to(acc) * out[:, :, s:e].to(acc)).sum(-1)
    if dlse is not None:
        delta -= dlse.to(acc)
    return delta


def chunked_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    *,
    causal: bool,
    scale: float | None,
    chunk_size: int,
    dlse: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`chunked_attention_forward`, recomputing probabilities from ``lse``.

    Loop order as in FPDT: outer over key/value chunks (their ``dk``/``dv`` are final at the
    end of the outer step), inner over query chunks; causally masked pairs are skipped. With
    ``P_ij = exp(scale·q_i·k_j − lse_i)`` and ``delta_i = Σ_d dout_i·out_i − dlse_i``:
    ``dv_j = Σ_i P_ij dout_i``, ``dS_ij = P_ij (dout_i·v_j − delta_i)``,
    ``dq_i = scale Σ_j dS_ij k_j``, ``dk_j = scale Σ_i dS_ij q_i`` (GQA: sums run over the
    query heads of a group too).

    Args:
        dout: ``[B, Hq, T, D]`` gradient of ``out``.
        q, k, v, out, lse: as in / returned by :func:`chunked_attention_forward`.
        dlse: optional ``[B, Hq, T]`` gradient of ``lse`` (``None`` = zero).
    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v``; ``dq`` is accumulated in
        the accumulation dtype and cast once at the end.
    """
    scale = check_arguments(q, k, v, causal, scale, chunk_size, "chunked_attention_backward")
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"chunked_attention_backward: dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"chunked_attention_backward: lse must be [B, Hq, T] = {list(q.shape[:3])}, got {tuple(lse.shape)}")
    if dlse is None and _cpu_kernel_applies(q, k, causal):
        return _backward_cpu_kernel(dout, q, k, v, out, lse, causal, scale, chunk_size)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    delta = _delta(dout, out, dlse, chunk_size, acc)
    dq_acc = torch.zeros((B, Hq, T, D), dtype=acc, device=q.device)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    for (ks, ke), query_chunks in chunk_schedule(T, S, chunk_size, causal, kv_outer=True):
        kc = k[:, :, ks:ke].to(acc)
        vc = v[:, :, ks:ke].to(acc)
        dk_acc = torch.zeros((B, Hkv, ke - ks, D), dtype=acc, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        for qs, qe in query_chunks:
            qc = _group_rows(q, qs, qe, Hkv, acc)
            doc = _group_rows(dout, qs, qe, Hkv, acc)
            lsec = _group_rows(lse, qs, qe, Hkv, acc).unsqueeze(-1)
            deltac = _group_rows(delta, qs, qe, Hkv, acc).unsqueeze(-1)
            s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)
            if causal:
                keep = _causal_keep(qs, qe, ks, ke, G, q.device)
                if keep is not None:
                    s.masked_fill_(~keep, float("-inf"))
            p = torch.exp_(s.sub_(lsec))
            dv_acc += torch.matmul(p.transpose(-1, -2), doc)
            ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(deltac).mul_(p)
            dk_acc += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
            dq_acc[:, :, qs:qe] += _ungroup_rows(torch.matmul(ds, kc).mul_(scale), Hq, qe - qs)
        dk[:, :, ks:ke] = dk_acc
        dv[:, :, ks:ke] = dv_acc
    return dq_acc.to(q.dtype), dk, dv


# ----------------------------------------------------------------------------------------
# CPU fast path: the same chunk schedule, each chunk pair computed by ATen's CPU flash
# attention kernel (vectorised C++, already tiled internally) instead of matmul + exp in
# Python-level torch ops (about 3x faster for T = 2K, chunk 512 on a 2-core CPU). A pair is either fully
# visible or the aligned diagonal block (T == S, equal chunking), which the kernel's own
# top-left causal mask covers exactly; anything else uses the generic path above.
#
# Exactness of the per-pair backward: the kernel recomputes P = exp(scale·q·kᵀ − lse) and
# delta = rowsum(dout·out) from what it is given. Given the *global* out and lse rows of the
# query chunk, P is the global probability block and delta the global delta, so its
# (dq, dk, dv) are exactly this pair's terms of the sums; we add them up. The kernel has no
# input for d(lse), so the fast backward is only used when dlse is None.
# ----------------------------------------------------------------------------------------

#: Switch for the CPU fast path (tests run both paths).
USE_CPU_KERNEL = True


def _cpu_kernel_applies(q: Tensor, k: Tensor, causal: bool) -> bool:
    return (
        USE_CPU_KERNEL
        and q.device.type == "cpu"
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
        and (not causal or q.shape[2] == k.shape[2])
    )


def _pair_is_diagonal(qs: int, qe: int, ks: int, ke: int, causal: bool) -> bool:
    if not causal or ke - 1 <= qs:
        return False
    # With T == S and one chunking for both, a partly masked pair is the aligned diagonal block.
    assert (qs, qe) == (ks, ke), "partly masked chunk pair off the diagonal"
    return True


def _forward_cpu_kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, chunk_size: int) -> tuple[Tensor, Tensor]:
    B, Hq, T, D = q.shape
    S = k.shape[2]
    acc = accumulation_dtype(q.dtype)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    out = torch.empty((B, Hq, T, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, Hq, T), dtype=acc, device=q.device)
    for (qs, qe), key_chunks in chunk_schedule(T, S, chunk_size, causal):
        # 16-bit inputs are merged in float32: the kernel would round each partial to 16 bits.
        qc = q[:, :, qs:qe].to(acc)
        o_acc = lse_acc = None
        for ks, ke in key_chunks:
            diagonal = _pair_is_diagonal(qs, qe, ks, ke, causal)
            o_part, l_part = flash(qc, k[:, :, ks:ke].to(acc), v[:, :, ks:ke].to(acc), 0.0, diagonal, scale=scale)
            if o_acc is None:
                o_acc, lse_acc = o_part, l_part.to(acc)
            else:
                o_acc, lse_acc = merge_partial(o_acc, lse_acc, o_part, l_part.to(acc))
        out[:, :, qs:qe] = o_acc
        lse[:, :, qs:qe] = lse_acc
    return out, lse


def _backward_cpu_kernel(dout, q, k, v, out, lse, causal: bool, scale: float, chunk_size: int) -> tuple[Tensor, Tensor, Tensor]:
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    dq_acc = torch.zeros((B, Hq, T, D), dtype=acc, device=q.device)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    for (ks, ke), query_chunks in chunk_schedule(T, S, chunk_size, causal, kv_outer=True):
        kc, vc = k[:, :, ks:ke].to(acc), v[:, :, ks:ke].to(acc)
        dk_acc = torch.zeros((B, Hkv, ke - ks, D), dtype=acc, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        for qs, qe in query_chunks:
            diagonal = _pair_is_diagonal(qs, qe, ks, ke, causal)
            dq_p, dk_p, dv_p = flash_bwd(
                dout[:, :, qs:qe].to(acc), q[:, :, qs:qe].to(acc), kc, vc,
                out[:, :, qs:qe].to(acc), lse[:, :, qs:qe].contiguous(), 0.0, diagonal, scale=scale,
            )
            dq_acc[:, :, qs:qe] += dq_p
            dk_acc += dk_p
            dv_acc += dv_p
        dk[:, :, ks:ke] = dk_acc
        dv[:, :, ks:ke] = dv_acc
    return dq_acc.to(q.dtype), dk, dv
