"""``torch.library`` registration of chunked attention, and the public ``chunked_attention``.

Ops (all ``mutates_args=()``; shapes in SDPA layout, ``G = Hq // Hkv``):

* ``longctx::chunked_attention_fwd(q, k, v, causal, scale, chunk_size, host_pool_bytes=None,
  window=0, softcap=0.0, sinks=None, segment_ids=None, key_segment_ids=None) -> (out, lse)``
* ``longctx::chunked_attention_bwd(dout, q, k, v, out, lse, dlse?, causal, scale, chunk_size,
  window=0, softcap=0.0, sinks=None, segment_ids=None, key_segment_ids=None) -> (dq, dk, dv,
  dsinks)``
* ``longctx::chunked_attention_fwd_offload(q, k, v, causal, scale, chunk_size,
  host_pool_bytes=None, window=0, softcap=0.0, sinks=None, segment_ids=None,
  key_segment_ids=None) -> (out, lse, handle)``: also copies q, k, v, out, lse into the host
  pool, within the budget ``host_pool_bytes`` (None: unbounded); ``handle`` is an int64
  scalar CPU tensor naming that group of host copies.
* ``longctx::chunked_attention_bwd_offload(dout, handle, dlse?, kv_heads, kv_len, causal,
  scale, chunk_size, window=0, softcap=0.0, sinks=None, segment_ids=None,
  key_segment_ids=None) -> (dq, dk, dv, dsinks)``: streams the host copies back chunk by
  chunk.
* ``longctx::attention_rows_see_keys(segment_ids, key_segment_ids, causal, window) ->
  key_segment_ids``: raises ``RuntimeError`` when some query row sees no key, else returns a
  copy of ``key_segment_ids`` (a pass routes the key ids through it for models whose own
  attention gives such rows something other than 0, so the check stays in the graph).

The variants (README, "Variants"): ``window > 0`` (with causal) keeps keys
``i - window < j <= i`` and skips chunk pairs outside that band; ``softcap > 0`` caps scores
to ``softcap·tanh(s / softcap)``; ``sinks`` ``[Hq]`` adds one logit per head to the softmax
denominator, and ``lse`` includes it. ``dsinks`` is ``[Hq]`` with sinks and an empty ``[0]``
tensor without (a backward op has one schema for both). ``segment_ids`` ``[B, T]`` (int,
``T == S``) restricts attention to one document (packed sequences) and skips chunk pairs
whose chunks share none; like ``sinks`` it is small and saved by autograd (never offloaded),
and it gets no gradient. ``key_segment_ids`` ``[B, S]`` (needs ``segment_ids``) gives the keys
their own ids (query ``i`` sees key ``j`` iff ``segment_ids[b, i] == key_segment_ids[b, j]``):
a padding mask is query ids 0, key ids 0 for real tokens and -1 for pads. Rows left without
a key give ``out = 0``, ``lse = -inf`` (the sink with sinks) and no gradient, as SDPA does for
an all-False boolean mask row.

``chunk_size = 0`` means "choose from the shapes at run time" (``chunked.auto_chunk_size``):
the graph then holds no chunk and serves every sequence length with a chunk fitted to it.
The two forward ops take the same arguments, so a pass can swap one for the other by target
(the plain op ignores ``host_pool_bytes``). The pool budget is an argument of each call, not
a setting of the process-wide pool: models with different budgets (or none) coexist, each
bounded by its own (``HostPool.offload(..., max_bytes=)`` keeps one account per budget).

Autocast: under ``torch.autocast`` the forward ops behave as SDPA does (it is on autocast's
lower-precision list): floating inputs other than float64 on the autocast device are cast
to the autocast dtype, then the op runs with fp32 accumulation inside. The dtype is read
when the op runs (``torch.get_autocast_dtype``), so bf16 and fp16 regions both work.

``register_autograd`` makes AOTAutograd save exactly what each backward reads: ``q, k, v,
out, lse`` for the plain op, and only the ``handle`` (plus the symbolic ints ``Hkv`` and
``S``) for the offload op; ``sinks``, ``segment_ids`` and ``key_segment_ids`` when given,
for both. Fake (meta) implementations use shape arithmetic only, so one
compiled graph serves every sequence length.

Device dispatch happens inside the op bodies: CPU tensors run the chunked torch
implementation, CUDA tensors the Triton launchers. We use plain ``custom_op`` rather than
``triton_op``: a ``triton_op`` body is traced by Inductor, and our chunk loops run
``T / chunk_size`` times — tracing would unroll them over the sequence length and pin one
graph to one ``T``. An opaque op keeps the loop inside and the graph size independent of ``T``.

Offload lifetime: the forward op has a side effect (it fills pool buffers), so it is not
pure in the strict sense. The host copies are released when the handle tensor's storage is
freed — autograd frees saved tensors right after the node's backward (or when the graph is
dropped without backward), so every forward is matched by exactly one release, and
``retain_graph=True`` double backward works. ``HostPool.clear()`` drops everything by force.
"""

from __future__ import annotations

import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from longctx_compiler.runtime.autocast import AUTOCAST_DEVICE_TYPES, autocast_cast, register_autocast

from longctx_compiler.runtime.host_pool import get_default_pool

from .chunked import (
    CUDA_AUTO_CHUNK,
    Documents,
    auto_chunk_size,
    check_arguments,
    chunk_schedule,
    chunked_attention_backward,
    chunked_attention_forward,
    out_like,
    rows_see_keys,
    sink_grad,
)
from .reference import accumulation_dtype

__all__ = ["chunked_attention", "attention_rows_see_keys", "FORWARD_ARGS", "forward_arg"]

#: The two forward ops' arguments, in schema order (one list: the passes that build or read
#: these calls index them by name through :func:`forward_arg`).
FORWARD_ARGS = ("q", "k", "v", "causal", "scale", "chunk_size", "host_pool_bytes", "window", "softcap", "sinks", "segment_ids",
                "key_segment_ids")
_FORWARD_DEFAULTS = {"host_pool_bytes": None, "window": 0, "softcap": 0.0, "sinks": None, "segment_ids": None,
                     "key_segment_ids": None}


def forward_arg(call, name: str):
    """Argument ``name`` of a forward op call node (``call.args``, then its default)."""
    index = FORWARD_ARGS.index(name)
    if len(call.args) > index:
        return call.args[index]
    return call.kwargs.get(name, _FORWARD_DEFAULTS.get(name))

_OFFLOADED = ("q", "k", "v", "out", "lse")


def _use_triton(t: Tensor) -> bool:
    return t.is_cuda and t.dtype != torch.float64


def _chunk(chunk_size: int) -> int | None:
    # The ops' schema holds an int; 0 stands for "chosen from the shapes at run time".
    return None if chunk_size == 0 else chunk_size


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, chunk_size: int,
                  window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None,
                  segment_ids: Tensor | None = None, key_segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
    chunk = _chunk(chunk_size)
    variants = dict(window=window, softcap=softcap, sinks=sinks, segment_ids=segment_ids, key_segment_ids=key_segment_ids)
    # Empty problems (no query or no key) take the torch path's early return on any device.
    if _use_triton(q) and q.numel() > 0 and k.numel() > 0:
        from .triton import triton_attention_forward

        if chunk is None:
            chunk = auto_chunk_size(q, k, fast=False, triton=True)
        return triton_attention_forward(q, k, v, causal=causal, scale=scale, chunk_size=chunk, **variants)
    return chunked_attention_forward(q, k, v, causal=causal, scale=scale, chunk_size=chunk, softmax_nan=True, **variants)


def _empty_dsinks(like: Tensor) -> Tensor:
    # The backward ops' dsinks without sinks: one schema serves both, at the cost of nothing.
    return like.new_empty((0,))


def _with_dsinks(grads: tuple[Tensor, ...], sinks: Tensor | None, like: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The backward ops' four outputs: ``dsinks`` is an empty ``[0]`` tensor without sinks."""
    return grads if sinks is not None else (*grads, _empty_dsinks(like))


def _backward_impl(dout, q, k, v, out, lse, dlse, causal, scale, chunk_size, window=0, softcap=0.0, sinks=None,
                   segment_ids=None, key_segment_ids=None):
    chunk = _chunk(chunk_size)
    variants = dict(window=window, softcap=softcap, sinks=sinks, segment_ids=segment_ids, key_segment_ids=key_segment_ids)
    if _use_triton(q) and q.numel() > 0 and k.numel() > 0:
        from .triton import triton_attention_backward

        if chunk is None:
            chunk = auto_chunk_size(q, k, fast=False, triton=True)
        grads = triton_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, chunk_size=chunk, dlse=dlse, **variants)
    else:
        grads = chunked_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, chunk_size=chunk, dlse=dlse, **variants)
    return _with_dsinks(grads, sinks, q)


def _fake_fwd(q: Tensor) -> tuple[Tensor, Tensor]:
    B, Hq, T, D = q.shape
    # q's layout (empty_like's rule), as every implementation returns it.
    out = out_like(q)
    lse = q.new_empty((B, Hq, T), dtype=accumulation_dtype(q.dtype))
    return out, lse


# ---------------------------------------------------------------------------- plain ops
@torch.library.custom_op("longctx::chunked_attention_fwd", mutates_args=())
def chunked_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, chunk_size: int, host_pool_bytes: Optional[int] = None,
    window: int = 0, softcap: float = 0.0, sinks: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
    key_segment_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """``(out [B, Hq, T, D], lse [B, Hq, T])`` of exact attention, chunk by chunk.

    ``chunk_size = 0``: chosen from the shapes. ``host_pool_bytes`` is unused here (it keeps
    the argument list equal to the offload op's). ``window``/``softcap``/``sinks ([Hq])``/
    ``segment_ids ([B, T] int)``/``key_segment_ids ([B, S] int)``: the variants (0 / 0.0 /
    None / None / None: off); with sinks, ``lse`` includes the sink term.
    """
    return _forward_impl(q, k, v, causal, scale, chunk_size, window, softcap, sinks, segment_ids, key_segment_ids)


@chunked_attention_fwd.register_fake
def _(q, k, v, causal, scale, chunk_size, host_pool_bytes=None, window=0, softcap=0.0, sinks=None, segment_ids=None,
      key_segment_ids=None):
    return _fake_fwd(q)


@torch.library.custom_op("longctx::chunked_attention_bwd", mutates_args=())
def chunked_attention_bwd(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dlse: Optional[Tensor],
    causal: bool, scale: float, chunk_size: int, window: int = 0, softcap: float = 0.0, sinks: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None, key_segment_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dsinks)``: the first three shaped like ``q, k, v``; ``dsinks`` ``[Hq]``
    with sinks, an empty ``[0]`` tensor without. ``dlse`` (``[B, Hq, T]``) may be None."""
    return _backward_impl(dout, q, k, v, out, lse, dlse, causal, scale, chunk_size, window, softcap, sinks, segment_ids,
                          key_segment_ids)


def _fake_dsinks(sinks: Tensor | None, like: Tensor) -> Tensor:
    return _empty_dsinks(like) if sinks is None else sinks.new_empty(sinks.shape)


@chunked_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, dlse, causal, scale, chunk_size, window=0, softcap=0.0, sinks=None, segment_ids=None,
      key_segment_ids=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), _fake_dsinks(sinks, q)


#: Positions of the forward ops' arguments (the two forward ops share one argument list).
_WINDOW, _SOFTCAP, _SINKS, _SEGMENT_IDS, _KEY_SEGMENT_IDS = (FORWARD_ARGS.index(n) for n in (
    "window", "softcap", "sinks", "segment_ids", "key_segment_ids"))


def _variants(inputs) -> tuple[int, float, Tensor | None, Tensor | None, Tensor | None]:
    """``(window, softcap, sinks, segment_ids, key_segment_ids)`` from a forward op's inputs
    (``setup_context`` receives every argument, defaults included)."""
    return inputs[_WINDOW], inputs[_SOFTCAP], inputs[_SINKS], inputs[_SEGMENT_IDS], inputs[_KEY_SEGMENT_IDS]


def _input_grads(ctx, dq, dk, dv, dsinks) -> tuple:
    """One gradient per forward input: q, k, v, and sinks when given (the ids: None)."""
    grads = [dq, dk, dv] + [None] * (ctx.n_args - 3)
    if ctx.has_sinks:
        grads[_SINKS] = dsinks
    return tuple(grads)


def _setup_fwd(ctx, inputs, output):
    q, k, v, causal, scale, chunk_size = inputs[:6]
    window, softcap, sinks, segment_ids, key_segment_ids = _variants(inputs)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, segment_ids, key_segment_ids)
    ctx.args = (causal, scale, chunk_size, window, softcap)
    ctx.n_args = len(inputs)
    ctx.has_sinks = sinks is not None


def _backward_fwd(ctx, dout, dlse):
    q, k, v, out, lse, sinks, segment_ids, key_segment_ids = ctx.saved_tensors
    causal, scale, chunk_size, window, softcap = ctx.args
    if dout is None:
        dout = torch.zeros_like(out)
    grads = chunked_attention_bwd(dout, q, k, v, out, lse, dlse, causal, scale, chunk_size, window, softcap, sinks, segment_ids,
                                  key_segment_ids)
    return _input_grads(ctx, *grads)


chunked_attention_fwd.register_autograd(_backward_fwd, setup_context=_setup_fwd)


# ---------------------------------------------------------------------------- offload ops
def _handle_tensor(pool, gid: int) -> Tensor:
    # The handle's storage wraps a numpy array; the array dies exactly when the last tensor
    # sharing that storage does (autograd's saved copies included), which releases the group.
    arr = np.array(gid, dtype=np.int64)
    weakref.finalize(arr, _release, weakref.ref(pool), gid)
    return torch.from_numpy(arr)


def _release(pool_ref, gid: int) -> None:
    pool = pool_ref()
    if pool is not None:
        pool.release_group(gid)


@torch.library.custom_op("longctx::chunked_attention_fwd_offload", mutates_args=())
def chunked_attention_fwd_offload(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, chunk_size: int, host_pool_bytes: Optional[int] = None,
    window: int = 0, softcap: float = 0.0, sinks: Optional[Tensor] = None, segment_ids: Optional[Tensor] = None,
    key_segment_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Like ``chunked_attention_fwd``, and keeps q, k, v, out, lse in the default host pool.

    ``host_pool_bytes``: the budget these copies count against (one account per budget
    value in the pool; None: unbounded). Past it the call raises ``HostMemoryError``.
    Returns ``(out, lse, handle)``; ``handle`` is an int64 scalar (CPU) naming the host copies.
    ``sinks`` (``[Hq]``, a few bytes) and ``segment_ids``/``key_segment_ids`` (``[B, T]``
    ints, ``1/(H·D)`` of ``q``'s numbers) stay where they are: autograd saves them for the
    backward.
    """
    out, lse = _forward_impl(q, k, v, causal, scale, chunk_size, window, softcap, sinks, segment_ids, key_segment_ids)
    pool = get_default_pool()
    handles = {}
    try:
        for name, t in zip(_OFFLOADED, (q, k, v, out, lse)):
            handles[name] = pool.offload(t, max_bytes=host_pool_bytes)
    except BaseException:
        for h in handles.values():
            h.release()
        raise
    return out, lse, _handle_tensor(pool, pool.stash(handles))


@chunked_attention_fwd_offload.register_fake
def _(q, k, v, causal, scale, chunk_size, host_pool_bytes=None, window=0, softcap=0.0, sinks=None, segment_ids=None,
      key_segment_ids=None):
    out, lse = _fake_fwd(q)
    return out, lse, torch.empty((), dtype=torch.int64, device="cpu")


def _offload_backward_cuda(dout, hs, pool, dlse, causal, scale, chunk_size, window=0, softcap=0.0, sinks=None,
                           segment_ids=None, key_segment_ids=None):
    """Streamed Triton backward: k/v chunks (outer) and q/lse chunks (inner) come from the
    host, each prefetched one step ahead on the copy stream (double buffering). Pairs outside
    a window's band, or whose chunks share no document, are neither fetched nor launched.
    Returns ``(dq, dk, dv)``, and ``dsinks`` fourth with ``sinks``."""
    from .triton import attention_delta, launch_bwd_pair, pair_segment_ids

    B, Hq, T, D = dout.shape
    _, Hkv, S, _ = hs["k"].shape
    dev = dout.device
    # delta needs out once per query row: stream out in chunks instead of bringing it all back.
    delta = torch.empty((B, Hq, T), dtype=torch.float32, device=dev)
    dsinks = None if sinks is None else torch.zeros(sinks.shape, dtype=torch.float32, device=dev)
    for s in range(0, T, chunk_size):
        e = min(s + chunk_size, T)
        oc = pool.prefetch(hs["out"], s, e)
        delta[:, :, s:e] = attention_delta(dout[:, :, s:e], oc, None if dlse is None else dlse[:, :, s:e], chunk_size)
        if sinks is not None:
            dsinks += sink_grad(pool.prefetch(hs["lse"], s, e), delta[:, :, s:e], sinks.float())
    dq_acc = torch.zeros((B, Hq, T, D), dtype=torch.float32, device=dev)
    dk = torch.empty((B, Hkv, S, D), dtype=hs["k"].dtype, device=dev)
    dv = torch.empty_like(dk)
    documents = Documents.of(segment_ids, chunk_size, key_segment_ids)
    schedule = list(chunk_schedule(T, S, chunk_size, causal, kv_outer=True, window=window, documents=documents))

    def fetch_kv(ks, ke):
        return pool.prefetch_async(hs["k"], ks, ke), pool.prefetch_async(hs["v"], ks, ke)

    def fetch_q(qs, qe):
        return pool.prefetch_async(hs["q"], qs, qe), pool.prefetch_async(hs["lse"], qs, qe)

    next_kv = fetch_kv(*schedule[0][0])
    for idx, ((ks, ke), query_chunks) in enumerate(schedule):
        kc, vc = (p.wait() for p in next_kv)
        if idx + 1 < len(schedule):
            next_kv = fetch_kv(*schedule[idx + 1][0])
        dk_acc = torch.zeros((B, Hkv, ke - ks, D), dtype=torch.float32, device=dev)
        dv_acc = torch.zeros_like(dk_acc)
        # A key chunk no query chunk meets (documents) is fetched but launches nothing.
        next_q = fetch_q(*query_chunks[0]) if query_chunks else None
        for jdx, (qs, qe) in enumerate(query_chunks):
            qc, lsec = (p.wait() for p in next_q)
            if jdx + 1 < len(query_chunks):
                next_q = fetch_q(*query_chunks[jdx + 1])
            # The lse/delta kernels read both with one set of strides: give both the dense layout.
            launch_bwd_pair(qc, kc, vc, dout[:, :, qs:qe], lsec.contiguous(), delta[:, :, qs:qe].contiguous(),
                            dq_acc[:, :, qs:qe], dk_acc, dv_acc, q_pos0=qs, k_pos0=ks, causal=causal, scale=scale,
                            window=window, softcap=softcap, **pair_segment_ids(documents, qs, ks))
        dk[:, :, ks:ke] = dk_acc
        dv[:, :, ks:ke] = dv_acc
    grads = (dq_acc.to(dout.dtype), dk, dv)
    return grads if sinks is None else (*grads, dsinks.to(sinks.dtype))


@torch.library.custom_op("longctx::chunked_attention_bwd_offload", mutates_args=())
def chunked_attention_bwd_offload(
    dout: Tensor, handle: Tensor, dlse: Optional[Tensor], kv_heads: int, kv_len: int,
    causal: bool, scale: float, chunk_size: int, window: int = 0, softcap: float = 0.0, sinks: Optional[Tensor] = None,
    segment_ids: Optional[Tensor] = None, key_segment_ids: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dsinks)`` from ``dout`` and the host copies named by ``handle``
    (``dsinks`` as in ``chunked_attention_bwd``).

    ``kv_heads``/``kv_len`` give ``dk``/``dv``'s shape ``[B, kv_heads, kv_len, D]`` to the
    fake implementation (the handle carries no shape). The host copies stay in the pool
    until the handle is freed, so a second backward (``retain_graph=True``) also works.
    """
    pool = get_default_pool()
    hs = pool.lookup(int(handle.item()))
    if tuple(hs["k"].shape[1:3]) != (kv_heads, kv_len) or tuple(hs["q"].shape) != tuple(dout.shape):
        raise RuntimeError("chunked_attention_bwd_offload: handle does not match dout / kv shape (stale handle?)")
    T = dout.shape[2]
    if _use_triton(dout) and dout.numel() > 0 and hs["k"].numel > 0:
        if chunk_size == 0:
            chunk_size = min(max(T, kv_len), CUDA_AUTO_CHUNK)
        grads = _offload_backward_cuda(dout, hs, pool, dlse, causal, scale, chunk_size, window, softcap, sinks, segment_ids,
                                       key_segment_ids)
        return _with_dsinks(grads, sinks, dout)
    # CPU: the host copies are CPU tensors already; prefetch hands back views (no copy) and the
    # chunked loop reads them chunk by chunk in the same order as on CUDA.
    q, k, v, out, lse = (pool.prefetch(hs[n]) for n in _OFFLOADED)
    if q.device != dout.device:
        q, k, v, out, lse = (t.to(dout.device) for t in (q, k, v, out, lse))
    grads = chunked_attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, chunk_size=_chunk(chunk_size),
                                       dlse=dlse, window=window, softcap=softcap, sinks=sinks, segment_ids=segment_ids,
                                       key_segment_ids=key_segment_ids)
    return _with_dsinks(grads, sinks, dout)


@chunked_attention_bwd_offload.register_fake
def _(dout, handle, dlse, kv_heads, kv_len, causal, scale, chunk_size, window=0, softcap=0.0, sinks=None, segment_ids=None,
      key_segment_ids=None):
    B, Hq, T, D = dout.shape
    kv = dout.new_empty((B, kv_heads, kv_len, D)), dout.new_empty((B, kv_heads, kv_len, D))
    return dout.new_empty((B, Hq, T, D)), *kv, _fake_dsinks(sinks, dout)


def _setup_fwd_offload(ctx, inputs, output):
    q, k, v, causal, scale, chunk_size = inputs[:6]
    window, softcap, sinks, segment_ids, key_segment_ids = _variants(inputs)
    _, _, handle = output
    ctx.save_for_backward(handle, sinks, segment_ids, key_segment_ids)
    ctx.kv = (k.shape[1], k.shape[2])
    ctx.args = (causal, scale, chunk_size, window, softcap)
    ctx.n_args = len(inputs)
    ctx.has_sinks = sinks is not None


def _backward_fwd_offload(ctx, dout, dlse, _dhandle):
    handle, sinks, segment_ids, key_segment_ids = ctx.saved_tensors
    causal, scale, chunk_size, window, softcap = ctx.args
    grads = chunked_attention_bwd_offload(dout, handle, dlse, ctx.kv[0], ctx.kv[1], causal, scale, chunk_size, window, softcap,
                                          sinks, segment_ids, key_segment_ids)
    return _input_grads(ctx, *grads)


chunked_attention_fwd_offload.register_autograd(_backward_fwd_offload, setup_context=_setup_fwd_offload)


# ---------------------------------------------------------------------------- empty rows check
ROWS_WITHOUT_KEYS_MESSAGE = (
    "a query row sees no key (a padded position before the first real token, i.e. left padding?): the model's eager "
    "attention spelling gives such rows an average over every key, which chunked attention does not reproduce; use "
    "right padding or attn_implementation='sdpa'"
)


def _check_ids_pair(segment_ids, key_segment_ids, causal, window, name: str) -> None:
    for arg, ids in (("segment_ids", segment_ids), ("key_segment_ids", key_segment_ids)):
        if not isinstance(ids, Tensor):
            raise TypeError(f"{name}: {arg} must be a Tensor [B, T] of ids, got {type(ids).__name__}")
        if ids.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name}: {arg} must be int32 or int64 ids, got dtype {ids.dtype}")
        if ids.dim() != 2:
            raise ValueError(f"{name}: {arg} must be [B, T], got shape {tuple(ids.shape)}")
    if segment_ids.shape != key_segment_ids.shape or segment_ids.device != key_segment_ids.device:
        raise ValueError(f"{name}: segment_ids {tuple(segment_ids.shape)} ({segment_ids.device}) and key_segment_ids "
                         f"{tuple(key_segment_ids.shape)} ({key_segment_ids.device}) must share shape and device")
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    if isinstance(window, bool) or not isinstance(window, int) or window < 0 or (window and not causal):
        raise ValueError(f"{name}: window must be an int >= 0 (> 0 only with causal=True), got {window!r}")


@torch.library.custom_op("longctx::attention_rows_see_keys", mutates_args=())
def attention_rows_see_keys(segment_ids: Tensor, key_segment_ids: Tensor, causal: bool, window: int) -> Tensor:
    """``key_segment_ids.clone()``, after checking that every query row sees some key.

    Query ``i`` of row ``b`` sees key ``j`` iff ``segment_ids[b, i] == key_segment_ids[b, j]``
    (and ``i - window < j <= i`` with causal / a window), as in ``chunked_attention_fwd``.
    Raises ``RuntimeError`` when a row sees none: chunked attention gives such a row 0 (SDPA's
    rule), while eager spellings that add a finite minimum to masked scores average every
    key there. A pass routes the key ids through this op for such models, so its output is
    used and the check cannot be eliminated. Exact for any ids, ``O(B·T·log(B·T))``
    (``chunked.rows_see_keys``).
    """
    _check_ids_pair(segment_ids, key_segment_ids, causal, window, "attention_rows_see_keys")
    if not bool(rows_see_keys(segment_ids, key_segment_ids, causal, window).all()):
        raise RuntimeError(f"attention_rows_see_keys: {ROWS_WITHOUT_KEYS_MESSAGE}")
    return key_segment_ids.clone()


@attention_rows_see_keys.register_fake
def _(segment_ids, key_segment_ids, causal, window):
    return key_segment_ids.new_empty(key_segment_ids.shape)


# ---------------------------------------------------------------------------- autocast
# SDPA is on autocast's lower-precision list: every floating input is cast (float64 excepted).
_AUTOCAST_LIB = torch.library.Library("longctx", "FRAGMENT")
register_autocast(_AUTOCAST_LIB, "chunked_attention_fwd", chunked_attention_fwd._opoverload, cast="all")
register_autocast(_AUTOCAST_LIB, "chunked_attention_fwd_offload", chunked_attention_fwd_offload._opoverload, cast="all")


# ---------------------------------------------------------------------------- public API
def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    scale: float | None = None,
    chunk_size: int | None = 1024,
    offload: bool = False,
    host_pool_bytes: int | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    segment_ids: Tensor | None = None,
    key_segment_ids: Tensor | None = None,
) -> Tensor:
    """Exact softmax attention with memory bounded by the chunk size (FPDT-style).

    Args:
        q: ``[B, Hq, T, D]`` queries (fp16, bf16, fp32 or fp64).
        k, v: ``[B, Hkv, S, D]`` keys/values; ``Hq % Hkv == 0`` (GQA without copying K/V).
        causal: SDPA's ``is_causal`` convention (top-left aligned: query ``i`` sees keys
            ``j <= i``), any ``T`` and ``S``.
        scale: score scale, default ``1 / sqrt(D)``.
        chunk_size: rows of a query chunk / columns of a key chunk; the largest temporary is
            ``[B, Hkv, G·chunk, chunk]`` in the accumulation dtype. None: chosen from the
            shapes when the op runs (``chunked.auto_chunk_size``).
        offload: keep q, k, v, out, lse in the host pool (pinned, copied on a side stream on
            CUDA) between forward and backward; autograd then saves only a handle.
        host_pool_bytes: with ``offload``, the bound on the host bytes held by calls with
            this same budget (``HostMemoryError`` past it); None: unbounded.
        window: sliding window (needs ``causal``): query ``i`` sees keys
            ``i - window < j <= i``; chunk pairs outside that band are skipped, so the cost is
            about ``2·window / T`` of causal attention's. 0: no window.
        softcap: logit soft-capping (Gemma 2): ``s = scale·q·k`` becomes
            ``softcap·tanh(s / softcap)`` before masking and softmax. 0: no cap.
        sinks: learned attention sinks (gpt-oss), ``[Hq]``: one logit per head added to the
            softmax denominator, with no value:
            ``P_ij = exp(s_ij) / (exp(sinks[h]) + Σ_j exp(s_ij))``. Not soft-capped.
        segment_ids: packed documents, int32/int64 ``[B, T]`` (self-attention, ``T == S``):
            query ``i`` sees key ``j`` only if ``segment_ids[b, i] == segment_ids[b, j]``,
            ANDed with ``causal`` and ``window``. Chunk pairs whose chunks share no document
            in any batch row are skipped, so packed documents of length ``L`` cost about
            ``L / T`` of causal attention over ``T`` (plus whole-chunk rounding). Ids need
            not be sorted; no gradient.
        key_segment_ids: the keys' own ids, int32/int64 ``[B, S]`` (needs ``segment_ids``):
            query ``i`` sees key ``j`` only if ``segment_ids[b, i] == key_segment_ids[b, j]``.
            A padding mask: query ids 0, key ids 0 for real tokens and -1 for padded ones
            (inside packed documents: key id = document id, -1 at pads). A query row that
            sees no key (left padding) gives 0 and no gradient, as SDPA does for an all-False
            boolean mask row; :func:`attention_rows_see_keys` refuses such rows instead.
    Returns:
        ``[B, Hq, T, D]`` in the input dtype. Differentiable in ``q``, ``k``, ``v`` (and
        ``sinks``).
    """
    if not isinstance(offload, bool):
        raise TypeError(f"chunked_attention: offload must be a bool, got {type(offload).__name__}")
    if isinstance(q, Tensor) and q.device.type in AUTOCAST_DEVICE_TYPES:
        # What the op's Autocast kernel does, done first so the arguments are checked as the
        # op will see them (q/k/v of different dtypes are fine under autocast, as for SDPA).
        q, k, v, sinks = autocast_cast((q, k, v, sinks), q.device.type)
    scale = check_arguments(q, k, v, causal, scale, chunk_size, "chunked_attention", window=window, softcap=softcap, sinks=sinks,
                            segment_ids=segment_ids, key_segment_ids=key_segment_ids)
    if host_pool_bytes is not None and (isinstance(host_pool_bytes, bool) or not isinstance(host_pool_bytes, int) or host_pool_bytes < 0):
        raise ValueError(f"chunked_attention: host_pool_bytes must be a non-negative int or None, got {host_pool_bytes!r}")
    if q.is_cuda and q.shape[-1] > 256 and q.dtype != torch.float64:
        raise ValueError(f"chunked_attention: head dim {q.shape[-1]} > 256 is not supported on CUDA")
    chunk = 0 if chunk_size is None else chunk_size
    variants = (window, float(softcap), sinks, segment_ids, key_segment_ids)
    if offload:
        return chunked_attention_fwd_offload(q, k, v, causal, scale, chunk, host_pool_bytes, *variants)[0]
    return chunked_attention_fwd(q, k, v, causal, scale, chunk, None, *variants)[0]
