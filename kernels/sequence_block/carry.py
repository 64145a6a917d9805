"""The two carries of a sequence block: a scan's state and an attention's K/V history.

A block body runs on one window of the sequence at a time (``chunked.py``). Whatever links
its chunk to the chunks before it goes through a :class:`Carry`, which the body's carry ops
read and write by *slot* (one slot per scan or attention node of the block):

* **state** (a selective scan, :func:`scan_in_window`, or a Mamba-2 SSD scan,
  :func:`ssd_in_window`): fixed size, ``[B, D, N]`` or ``[B, H, P, N]``, carried as
  ``[B, D, N]`` / ``[B, H, P·N]`` (every state is three-dimensional to the runtime). The
  chunk starts from the state its predecessor left and leaves its own final state; its
  adjoint ``λ`` flows back from chunk to chunk.
* **K/V history** (causal attention, :func:`attention_in_window`): grows with T. The chunk's
  queries attend to every earlier chunk's keys/values (kept in the host pool by a
  :class:`KVHistory`, read back one piece at a time) and, causally, to its own. Its adjoint is
  a pair of accumulators ``dK, dV`` (host tier, accumulation dtype): every later chunk adds
  the gradient of the history it read; when the backward walk reaches a chunk, the sum is the
  cotangent of that chunk's own ``k, v``.

A whole-sequence carry (:meth:`Carry.whole`, no history object) makes the carry ops behave
like the nodes they replaced; the op's fake implementation uses it to get output shapes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Registers torch.ops.longctx.selective_scan_fwd and chunked_attention_fwd.
from longctx_compiler.kernels.attention import op as _attention_op  # noqa: F401
from longctx_compiler.kernels.attention.chunked import chunked_attention_backward, chunked_attention_forward, merge_partial
from longctx_compiler.kernels.attention.op import FORWARD_ARGS
from longctx_compiler.kernels.attention.reference import accumulation_dtype
from longctx_compiler.kernels.selective_scan import op as _scan_op  # noqa: F401
from longctx_compiler.kernels.selective_scan.schema import SEQUENCE_DIMS as SCAN_DIMS
from longctx_compiler.kernels.selective_scan.schema import ScanArgs
from longctx_compiler.kernels.ssd import op as _ssd_op  # noqa: F401 - registers longctx::ssd_fwd
from longctx_compiler.kernels.ssd.schema import SEQUENCE_DIMS as SSD_DIMS
from longctx_compiler.kernels.ssd.schema import SSDArgs
from longctx_compiler.runtime.autocast import AUTOCAST_DEVICE_TYPES, autocast_cast
from longctx_compiler.runtime.host_pool import HostHandle, HostPool
from longctx_compiler.runtime.sequence_parallel import SequenceParallelError, get_group

__all__ = ["Carry", "KVHistory", "scan_in_window", "ssd_in_window", "attention_in_window"]


class Carry:
    """What one run of a block body on the window ``[t0 - hc, t1)`` exchanges across chunks.

    Attributes:
        hc: tokens of the window before the chunk (its halo; their outputs are dropped).
        t0: the chunk's first position in the sequence.
        states_in: per scan slot, the state entering the chunk (None: the node's own ``h0``).
        states_out: per scan slot, the state leaving the chunk (set by the scan).
        histories: per attention slot, the K/V history; None for a whole-sequence run.
        own: per attention slot, ``(k, v)`` of the chunk's own tokens ``[B, Hkv, t1 - t0, D]``
            as the body computed them (set by the attention; the forward appends them to the
            history, the backward gives them the accumulated ``dK, dV`` as cotangents). Under
            sequence parallelism, the whole group's chunk for this rank's heads
            (``[B, Hkv'/P, P·(t1 - t0), D]``, after the all-to-all).
        group: the sequence-parallel group's name (None: the sequence is not sharded).
    """

    def __init__(self, hc: int, t0: int, states_in: list[Tensor | None], histories: list["KVHistory"] | None, attentions: int,
                 group: str | None = None):
        self.hc = hc
        self.t0 = t0
        self.states_in = states_in
        self.states_out: list[Tensor | None] = [None] * len(states_in)
        self.histories = histories
        self.own: list[tuple[Tensor, Tensor] | None] = [None] * attentions
        self.group = group

    @property
    def history_start(self) -> int:
        """Where the chunk's own keys go in the K/V history: ``t0``, or ``P·t0`` when the
        sequence is sharded (chunk-interleaved: the ``c`` chunks of every rank come first)."""
        return self.t0 if self.group is None else self.t0 * get_group(self.group).size

    @classmethod
    def whole(cls, scans: int, attentions: int) -> "Carry":
        """The carry of a run on the whole sequence: every carry op acts as the original node."""
        return cls(0, 0, [None] * scans, None, attentions)


def _own_tokens(args: tuple, fields: tuple[str, ...], dims: dict[str, int], hc: int) -> dict[str, Any]:
    """The sequence arguments (``dims``: name → sequence dim) of a call on a window, narrowed
    to the chunk's own tokens (the window minus its ``hc`` halo tokens)."""
    out = {}
    for name, d in dims.items():
        t = args[fields.index(name)]
        if t is not None and hc:
            out[name] = t.narrow(d, hc, t.shape[d] - hc)
    return out


def _reset_where_a_document_starts(state: Tensor, seq_idx: Tensor, hc: int, what: str) -> Tensor:
    """The carried ``state`` ``[B, ...]``, zero for each batch row whose document index changes
    from the token before the chunk (the window's last halo token, ``hc - 1``) to its first
    (``hc``): the whole-sequence scan resets there."""
    if not hc:
        raise RuntimeError(f"sequence_block: {what} with documents needs the token before each chunk (a halo of at least 1)")
    same = seq_idx[:, hc] == seq_idx[:, hc - 1]
    return torch.where(same.view(-1, *[1] * (state.dim() - 1)), state, state.new_zeros(()))


def scan_in_window(*rest):
    """The block's selective scan inside a window: scan tokens ``hc..`` from the carried state
    (the node's own ``h0`` for the first chunk); returns ``(y padded with hc leading zeros,
    final)``. The state ``[B, D, N]`` is carried as it is.

    With documents (``seq_idx``), as in :func:`ssd_in_window`: the carried state is dropped
    for each batch row whose document index changes from the token before the chunk (the
    window's last halo token) to the chunk's first, where the whole-sequence scan resets it.

    Arguments: those of ``longctx::selective_scan_fwd`` (:class:`ScanArgs`), then ``slot, carry``.
    """
    *args, slot, carry = rest
    args = ScanArgs(*args)
    hc = carry.hc
    h_in = carry.states_in[slot]
    if h_in is not None and args.seq_idx is not None:
        h_in = _reset_where_a_document_starts(h_in, args.seq_idx, hc, "a selective scan")
    own = args._replace(**_own_tokens(args, ScanArgs._fields, SCAN_DIMS, hc), **({} if h_in is None else {"h0": h_in}))
    y, final, _ = torch.ops.longctx.selective_scan_fwd(*own)
    carry.states_out[slot] = final
    return (F.pad(y, (hc, 0)) if hc else y), final


def ssd_in_window(*rest):
    """The block's SSD scan (Mamba-2) inside a window: scan tokens ``hc..`` from the carried
    state (the node's own ``initial_states`` for the first chunk); returns ``(out [B, L, H, P]
    padded with hc leading zeros, final states)``. The state ``[B, H, P, N]`` is carried as
    ``[B, H, P·N]``, the SSD op's own boundary layout.

    With documents (``seq_idx``), one that starts at the chunk's first token resets the state
    there, as it does in the whole sequence: the carried state is dropped for each batch row
    whose document index changes from the token before the chunk (the window's last halo
    token: the block's halo is at least 1, ``CarrySite.reach``). Resets inside the chunk are
    the op's own.

    Arguments: those of ``longctx::ssd_fwd`` (:class:`SSDArgs`), then ``slot, carry``.
    """
    *args, slot, carry = rest
    args = SSDArgs(*args)
    hc = carry.hc
    h_in = carry.states_in[slot]
    own = args._replace(**_own_tokens(args, SSDArgs._fields, SSD_DIMS, hc))
    if h_in is not None:
        h = h_in.unflatten(-1, (args.x.shape[-1], args.B.shape[-1]))
        if args.seq_idx is not None:
            h = _reset_where_a_document_starts(h, args.seq_idx, hc, "an SSD scan")
        own = own._replace(initial_states=h)
    out, final, _ = torch.ops.longctx.ssd_fwd(*own)
    carry.states_out[slot] = final.flatten(2)
    return (F.pad(out, (0, 0, 0, 0, hc, 0)) if hc else out), final


def attention_in_window(q, k, v, causal: bool, scale: float, chunk_size: int, *rest):
    """The layer's causal attention inside a window (``q`` ``[B, Hq, L, D]``, ``k``/``v``
    ``[B, Hkv, L, D]``, the window's ``L`` tokens): the chunk's own queries attend to the K/V
    history (every earlier position, or with a sliding window the ones in its band) and
    causally to their own keys; soft-caps and sinks as the op applies them. Returns
    ``(out padded with hc leading zeros, None)`` (the log-sum-exp is not an output of a block).

    Arguments: those of ``longctx::chunked_attention_fwd`` (``chunk_size`` 0: chosen from the
    shapes; further arguments of the op are passed through), then ``slot, carry``.
    """
    *extra, slot, carry = rest
    if carry.histories is None:
        return torch.ops.longctx.chunked_attention_fwd(q, k, v, causal, scale, chunk_size, *extra)
    if not causal:
        raise RuntimeError("sequence_block: a windowed attention must be causal (the prover checks this)")
    variants = dict(zip(FORWARD_ARGS[6:], extra))  # host_pool_bytes (unused here), window, softcap, sinks, ids
    window, softcap, sinks = variants.get("window") or 0, variants.get("softcap") or 0.0, variants.get("sinks")
    ids, key_ids = variants.get("segment_ids"), variants.get("key_segment_ids")
    if carry.group is not None and (window or softcap or sinks is not None or ids is not None):
        raise RuntimeError("sequence_block: windows, soft-caps, sinks and document ids are not exchanged under sequence "
                           "parallelism (the pass refuses them)")
    if q.device.type in AUTOCAST_DEVICE_TYPES:
        # The op's Autocast kernel (SDPA's rule) is not on this path: cast here, as it would.
        q, k, v = autocast_cast((q, k, v), q.device.type)
    hc = carry.hc
    n = q.shape[2] - hc
    qo, ko, vo = (t.narrow(2, hc, n) for t in (q, k, v))
    if carry.group is not None:
        qo, ko, vo = _heads_for_sequence(qo, ko, vo, carry.group)
    # Documents (padding): the chunk's own queries' and keys' ids; the keys' go into the history.
    qids = None if ids is None else ids.narrow(1, hc, n)
    kids = None if ids is None else (ids if key_ids is None else key_ids).narrow(1, hc, n)
    carry.own[slot] = (ko, vo) if kids is None else (ko, vo, kids)
    out = HistoryAttention.apply(qo, ko, vo, sinks, carry.histories[slot], carry.history_start, scale, chunk_size or None, window,
                                 softcap, qids, kids)
    if carry.group is not None:
        out = torch.ops.longctx.seq_all_to_all(out, 2, 1, carry.group)
    return (F.pad(out, (0, 0, hc, 0)) if hc else out), None


def _heads_for_sequence(q: Tensor, k: Tensor, v: Tensor, group: str) -> tuple[Tensor, Tensor, Tensor]:
    """Ulysses' exchange of one chunk: ``[B, H, n, D]`` on each of ``P`` ranks (the group's
    ``c``-th chunks) → ``[B, H/P, P·n, D]``, the whole group of chunks — consecutive tokens in
    the chunk-interleaved layout — for this rank's heads. With fewer KV heads than ranks (GQA),
    each is repeated ``P / H_kv`` times first, so every rank gets the one its queries read."""
    P = get_group(group).size
    hq, hkv = q.shape[1], k.shape[1]
    if hq % P or (hkv % P and P % hkv):
        raise SequenceParallelError(f"sequence_block: {hq} query / {hkv} key-value heads cannot be split over sequence_parallel={P} ranks")
    if hkv < P:
        k, v = (t.repeat_interleave(P // hkv, dim=1) for t in (k, v))
    return tuple(torch.ops.longctx.seq_all_to_all(t, 1, 2, group) for t in (q, k, v))


def acquire(pool: HostPool, numel: int, dtype: torch.dtype, budget: int | None):
    """A pool buffer, counted against ``budget`` (the configured host-pool bound) when given."""
    return pool.acquire(numel, dtype) if budget is None else pool.acquire(numel, dtype, max_bytes=budget)


def offload(pool: HostPool, tensor: Tensor, budget: int | None) -> HostHandle:
    """``tensor``'s copy in the pool, counted against ``budget`` when given."""
    return pool.offload(tensor) if budget is None else pool.offload(tensor, max_bytes=budget)


class KVHistory:
    """One attention's keys and values ``[B, Hkv, T, D]`` in the host pool, and their adjoint.

    Forward: :meth:`append` writes each chunk's ``k, v`` at its positions (the buffers are
    taken from the pool at the first chunk, so a budget too small fails before any work).
    Backward: :meth:`start_backward` adds the accumulators ``dK, dV`` (accumulation dtype,
    zero); :meth:`pieces` reads the history back ``piece`` positions at a time (prefetching the
    next piece while the caller works on the current one); :meth:`add_grad` adds a piece's
    gradient; :meth:`grad` reads a chunk's accumulated gradient. Positions are along dim 2.
    """

    def __init__(self, pool: HostPool, length: int, piece: int, k: HostHandle | None = None, v: HostHandle | None = None,
                 budget: int | None = None):
        self.pool = pool
        self.budget = budget
        self.length = length
        self.piece = piece
        self.k, self.v = k, v
        #: the keys' document ids ``[B, T]`` (packed documents, padded keys: -1), if any; small,
        #: kept as a plain tensor on the compute device
        self.ids: Tensor | None = None
        self.dk: HostHandle | None = None
        self.dv: HostHandle | None = None

    def _new(self, like: Tensor, dtype: torch.dtype) -> HostHandle:
        shape = torch.Size((*like.shape[:2], self.length, *like.shape[3:]))
        numel = shape.numel()
        return HostHandle(self.pool, acquire(self.pool, numel, dtype, self.budget), shape, dtype, like.device)

    def append(self, t0: int, k: Tensor, v: Tensor, ids: Tensor | None = None) -> None:
        if ids is not None:
            if self.ids is None:
                self.ids = ids.new_empty((ids.shape[0], self.length))
            self.ids.narrow(1, t0, ids.shape[1]).copy_(ids)
        if self.k is None:
            self.k = self._new(k, k.dtype)
            try:
                self.v = self._new(v, v.dtype)
            except BaseException:
                self.release()
                raise
        n = k.shape[2]
        self.k.host.narrow(2, t0, n).copy_(k)
        self.v.host.narrow(2, t0, n).copy_(v)

    def start_backward(self) -> None:
        acc = accumulation_dtype(self.k.dtype)
        self.dk = HostHandle(self.pool, acquire(self.pool, self.k.numel, acc, self.budget), self.k.shape, acc, self.k.device)
        try:
            self.dv = HostHandle(self.pool, acquire(self.pool, self.v.numel, acc, self.budget), self.v.shape, acc, self.v.device)
        except BaseException:
            self.dk.release()
            raise
        self.dk.host.zero_()
        self.dv.host.zero_()

    def pieces(self, stop: int):
        """``(s, e, K[:, :, s:e], V[:, :, s:e])`` for the history before ``stop``, in order."""
        starts = list(range(0, stop, self.piece))
        if not starts:
            return

        def fetch(s):
            e = min(s + self.piece, stop)
            return self.pool.prefetch_async(self.k, s, e), self.pool.prefetch_async(self.v, s, e)

        pending = fetch(starts[0])
        for i, s in enumerate(starts):
            kc, vc = (p.wait() for p in pending)
            if i + 1 < len(starts):
                pending = fetch(starts[i + 1])
            yield s, min(s + self.piece, stop), kc, vc

    def read(self, start: int, stop: int) -> tuple[Tensor, Tensor]:
        """``K[:, :, start:stop], V[:, :, start:stop]`` on the compute device."""
        return self.pool.prefetch(self.k, start, stop), self.pool.prefetch(self.v, start, stop)

    def key_ids(self, start: int, stop: int) -> Tensor | None:
        """The keys' document ids ``[B, stop - start]``, None without documents."""
        return None if self.ids is None else self.ids[:, start:stop]

    def add_grad(self, s: int, dk: Tensor, dv: Tensor) -> None:
        n = dk.shape[2]
        self.dk.host.narrow(2, s, n).add_(dk.to(self.dk.host.device, self.dk.dtype))
        self.dv.host.narrow(2, s, n).add_(dv.to(self.dv.host.device, self.dv.dtype))

    def grad(self, t0: int, t1: int) -> tuple[Tensor, Tensor]:
        return self.pool.prefetch(self.dk, t0, t1), self.pool.prefetch(self.dv, t0, t1)

    def handles(self) -> dict[str, HostHandle]:
        """The history's host copies, to keep for the backward: ``k``, ``v`` and, with
        documents, the keys' ids (moved to the host pool here: the forward is done with them)."""
        handles = {name: h for name, h in (("k", self.k), ("v", self.v)) if h is not None}
        if self.ids is not None:
            handles["ids"] = offload(self.pool, self.ids, self.budget)
        return handles

    def release_grads(self) -> None:
        for h in (self.dk, self.dv):
            if h is not None:
                h.release()
        self.dk = self.dv = None

    def release(self) -> None:
        self.release_grads()
        for h in (self.k, self.v):
            if h is not None:
                h.release()
        self.k = self.v = None
        self.ids = None


class HistoryAttention(torch.autograd.Function):
    """``out = softmax(cap(scale · q [K_hist; k]ᵀ) + mask) [V_hist; v]`` for one chunk.

    Shapes: ``q`` ``[B, Hq, n, D]``, ``k``/``v`` ``[B, Hkv, n, D]`` (the chunk's own tokens at
    positions ``t0 .. t0 + n``), history ``[B, Hkv, t0, D]`` (earlier positions); ``sinks``
    ``[Hq]`` or None. The variants are the op's: ``window`` (query ``i`` sees keys
    ``i − window < j <= i``), ``softcap`` (``cap·tanh(s / cap)`` on every score), ``sinks``
    (one logit per head in every row's denominator, counted once).

    Without a window every history position is visible to every query. Forward: the causal
    diagonal part (with the sinks), then each history piece non-causally, merged by the online
    softmax in the accumulation dtype. Backward: the flash backward of each part evaluated
    with the *final* ``out, lse`` gives that part's exact terms: ``dq`` is their sum, ``dk,
    dv`` (and ``dsinks``) the diagonal part's, and each history piece's ``dK, dV`` go into the
    history's accumulators (the carry's adjoint), not to autograd.

    With a window the chunk reads only the ``h = min(t0, window − 1)`` history positions
    before it. They are read back and put in front of the chunk's keys, and the queries get
    ``h`` zero rows in front: over those ``h + n`` positions the op's own top-left causal
    window is exactly the band at the chunk's absolute positions (row ``h + i`` is query
    ``t0 + i``, column ``c`` key ``t0 − h + c``). One call, so every variant of the op applies
    as it is; the zero rows get ``dout = 0`` and add nothing to any gradient (≤ window − 1
    extra rows of work per chunk). Their ``dK, dV`` go to the history's accumulators.
    """

    @staticmethod
    def forward(ctx: Any, q: Tensor, k: Tensor, v: Tensor, sinks: Tensor | None, history: KVHistory, t0: int, scale: float,
                chunk: int, window: int, softcap: float, qids: Tensor | None = None, kids: Tensor | None = None) -> Tensor:
        ctx.history, ctx.t0, ctx.scale, ctx.chunk, ctx.window, ctx.softcap = history, t0, scale, chunk, window, softcap
        ctx.has_sinks = sinks is not None
        ctx.qids, ctx.kids = qids, kids
        if window:
            h = min(t0, window - 1)
            qq, kk, vv, ids = _band_operands(q, k, v, history, t0, h, qids, kids)
            o, lse = chunked_attention_forward(qq, kk, vv, causal=True, scale=scale, chunk_size=chunk, window=window,
                                               softcap=softcap, sinks=sinks, **ids)
            ctx.h = h
            ctx.save_for_backward(q, k, v, o, lse, sinks)
            return o[:, :, h:]
        acc = accumulation_dtype(q.dtype)
        o, lse = chunked_attention_forward(q, k, v, causal=True, scale=scale, chunk_size=chunk, softcap=softcap, sinks=sinks,
                                           **_ids(qids, kids))
        o = o.to(acc)
        for s, e, kc, vc in history.pieces(t0):
            o_part, l_part = chunked_attention_forward(q, kc, vc, causal=False, scale=scale, chunk_size=chunk, softcap=softcap,
                                                       **_ids(qids, history.key_ids(s, e)))
            o, lse = merge_partial(o, lse, o_part.to(acc), l_part)
        out = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        return out

    @staticmethod
    def backward(ctx: Any, dout: Tensor):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        history, scale, chunk, softcap, qids, kids = ctx.history, ctx.scale, ctx.chunk, ctx.softcap, ctx.qids, ctx.kids
        none = (None,) * 8  # history, t0, scale, chunk, window, softcap, qids, kids
        if ctx.window:
            h = ctx.h
            qq, kk, vv, ids = _band_operands(q, k, v, history, ctx.t0, h, qids, kids)
            grads = chunked_attention_backward(F.pad(dout, (0, 0, h, 0)), qq, kk, vv, out, lse, causal=True, scale=scale,
                                               chunk_size=chunk, window=ctx.window, softcap=softcap, sinks=sinks, **ids)
            dq, dk, dv = grads[0][:, :, h:], grads[1][:, :, h:], grads[2][:, :, h:]
            if h:
                history.add_grad(ctx.t0 - h, grads[1][:, :, :h], grads[2][:, :, :h])
            return dq, dk, dv, grads[3] if ctx.has_sinks else None, *none
        grads = chunked_attention_backward(dout, q, k, v, out, lse, causal=True, scale=scale, chunk_size=chunk,
                                           softcap=softcap, sinks=sinks, **_ids(qids, kids))
        dq, dk, dv = grads[:3]
        if ctx.t0:
            dq = dq.to(accumulation_dtype(q.dtype))
            for s, e, kc, vc in history.pieces(ctx.t0):
                dq_p, dk_p, dv_p = chunked_attention_backward(dout, q, kc, vc, out, lse, causal=False, scale=scale, chunk_size=chunk,
                                                              softcap=softcap, **_ids(qids, history.key_ids(s, e)))
                dq += dq_p
                history.add_grad(s, dk_p, dv_p)
            dq = dq.to(q.dtype)
        return dq, dk, dv, grads[3] if ctx.has_sinks else None, *none


def _ids(qids: Tensor | None, kids: Tensor | None) -> dict[str, Tensor]:
    """The op's id arguments for one part: the chunk's queries' and that part's keys' ids."""
    return {} if qids is None else {"segment_ids": qids, "key_segment_ids": kids}


#: A query id no key holds (keys hold document ids >= 0, or -1 at padding).
_NO_KEY = -2


def _band_operands(q: Tensor, k: Tensor, v: Tensor, history: KVHistory, t0: int, h: int, qids: Tensor | None,
                   kids: Tensor | None) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """A windowed chunk's one call: ``h`` zero query rows, then its queries; the ``h`` history
    positions before ``t0``, then its own keys and values (:class:`HistoryAttention`); with
    documents, their ids (the zero rows' ids match no key: they see nothing)."""
    if not h:
        return q, k, v, _ids(qids, kids)
    kh, vh = history.read(t0 - h, t0)
    ids = {}
    if qids is not None:
        ids = {"segment_ids": F.pad(qids, (h, 0), value=_NO_KEY), "key_segment_ids": torch.cat([history.key_ids(t0 - h, t0), kids], 1)}
    return F.pad(q, (0, 0, h, 0)), torch.cat([kh.to(k.dtype), k], 2), torch.cat([vh.to(v.dtype), v], 2), ids
