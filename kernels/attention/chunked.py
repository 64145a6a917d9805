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

``chunk_size=None`` chooses the chunk at run time from the shapes (:func:`auto_chunk_size`):
one compiled graph then serves every sequence length with a chunk fitted to each.

Causal masking follows SDPA's top-left convention (query ``i`` sees keys ``j <= i``), for any
``T`` and ``S``; a sliding window ``w`` narrows it to ``i - w < j <= i``. Chunk pairs outside
that band (every key right of every query, or ``w`` or more left of it) are skipped: no
compute, no memory; pairs inside it are computed without a mask. Without a window key chunk
0 is visible to every query; later chunks may be fully masked for some rows
(``lse_part = -inf``), which the merge handles, as it handles a running ``LSE`` of ``-inf``
(every score seen so far ``-inf`` because of the data).

Variants (README, "Variants"): ``softcap`` caps every score to ``softcap·tanh(s / softcap)``
(:func:`_pair_scores`, shared by forward and backward); ``sinks`` ``[Hq]`` join each row's
softmax denominator (:func:`fold_sinks`), the returned ``lse`` includes them, and their
gradient is a row reduction (:func:`sink_grad`).

Documents (packed sequences, README "Documents"): ``segment_ids`` ``[B, T]`` (``T == S``)
keeps key ``j`` for query ``i`` only inside one document. :class:`Documents` holds each
chunk's id range per batch row (one ``.tolist()`` per call), and the one schedule classifies
every pair with it: skipped when no row's ranges meet (:meth:`Documents.meet`), unmasked by
documents when every row's ids in both chunks are one value (:meth:`Documents.one_document`;
on CPU such pairs still reach ATen's kernel), masked with ``seg_i == seg_j`` otherwise.
``key_segment_ids`` ``[B, S]`` gives the keys their own ids (query ``i`` sees key ``j`` iff
``segment_ids[b, i] == key_segment_ids[b, j]``): the query side of every classification reads
``segment_ids``, the key side ``key_segment_ids``. That expresses padding (query ids 0, key ids
0 for real tokens and -1 for pads), and it makes rows that see no key possible (a padded query
before the first real token): like SDPA with an all-False boolean mask row they give
``out = 0``, ``lse = -inf`` (the sink with sinks) and no gradient, as a window's rows past the
last key already do (:func:`rows_see_keys` finds them; :func:`chunked_attention_forward` keeps
them out of ``softmax_nan``).

Non-finite values (see README, "Non-finite values"): a nan or infinity reaches exactly the
outputs whose softmax row reads it, through the max and the sum, as softmax does; rows whose
every visible score is ``-inf`` are nan like softmax's (``softmax_nan=True``, what the op
uses) and ``S = 0`` gives ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .reference import accumulation_dtype, same_document, validate_qkv, validate_segment_ids, validate_variants

__all__ = [
    "chunked_attention_forward",
    "chunked_attention_backward",
    "chunk_schedule",
    "pair_needs_mask",
    "Documents",
    "merge_partial",
    "fold_sinks",
    "sink_grad",
    "check_arguments",
    "auto_chunk_size",
    "out_like",
    "cpu_kernel_applies",
    "rows_see_keys",
]

#: Chunk the CUDA (Triton) path uses when ``chunk_size`` is None: the kernels tile inside a
#: chunk pair, so the chunk only sets the launch and host-transfer granularity (FPDT's chunks
#: of 8K-64K tokens hide the transfers behind compute).
CUDA_AUTO_CHUNK = 16384
#: Smallest chunk the torch path picks by itself (smaller ones only add Python overhead).
MIN_AUTO_CHUNK = 64


def check_arguments(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, chunk_size: int | None, name: str,
    *, window: int = 0, softcap: float = 0.0, sinks: Tensor | None = None, segment_ids: Tensor | None = None,
    key_segment_ids: Tensor | None = None,
) -> float:
    """Validate the arguments shared by every chunked-attention entry point; return the scale.

    ``chunk_size`` is a positive int, or None: chosen at run time (:func:`auto_chunk_size`).
    ``window``, ``softcap``, ``sinks``: see :func:`.reference.validate_variants`;
    ``segment_ids``, ``key_segment_ids``: see :func:`.reference.validate_segment_ids`.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"{name}: causal must be a bool, got {type(causal).__name__}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise TypeError(f"{name}: chunk_size must be an int or None (chosen from the shapes), got {type(chunk_size).__name__}")
        if chunk_size < 1:
            raise ValueError(f"{name}: chunk_size must be >= 1 (or None: chosen from the shapes), got {chunk_size}")
    validate_qkv(q, k, v, scale=scale, name=name)
    validate_variants(q, causal, window, softcap, sinks, name=name)
    validate_segment_ids(q, k, segment_ids, name=name, key_segment_ids=key_segment_ids)
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def auto_chunk_size(q: Tensor, k: Tensor, *, fast: bool, triton: bool = False, window: int = 0) -> int:
    """The chunk used when ``chunk_size`` is None, from the run-time shapes.

    * Triton kernels (CUDA, ``triton``): ``min(max(T, S), CUDA_AUTO_CHUNK)`` — the kernels
      tile inside a pair; the chunk is the launch and host-transfer granularity.
    * ATen's CPU flash kernel (``fast``): ``max(T, S)``, one chunk pair — the kernel tiles
      internally, so its memory is what eager SDPA's is, and every extra chunk would only
      add merges.
    * The torch path (any device): the largest ``C`` whose two live score blocks
      ``[B, Hkv, G·C, C]`` (the backward's probabilities and their gradient) hold no more
      numbers than ``q`` itself (``2·C² ≤ T·D``), at least ``MIN_AUTO_CHUNK``: the working
      set then never outgrows the ``O(T·D)`` tensors the step holds anyway. With a sliding
      window ``w`` also at most ``max(MIN_AUTO_CHUNK, w // 2)``: a query chunk of ``C`` rows
      computes whole key chunks covering ``w + C - 1`` keys, at most ``w + 3C`` columns, so
      the work stays within ``2.5x`` of the band's.

    With documents the callers pass ``fast=False`` on CPU: a pair holding several documents
    runs the torch path, so one pair over the whole problem would be a ``[T, S]`` block.
    """
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    n = max(T, S, 1)
    if triton:
        return min(n, CUDA_AUTO_CHUNK)
    if fast:
        return n
    chunk = min(n, max(MIN_AUTO_CHUNK, math.isqrt(n * max(D, 1) // 2)))
    return min(chunk, max(MIN_AUTO_CHUNK, window // 2)) if window else chunk


def visible_keys(qs: int, qe: int, S: int, causal: bool, window: int = 0) -> tuple[int, int]:
    """Key positions ``[lo, hi)`` seen by at least one query of ``[qs, qe)`` (``lo == hi``: none).

    Query ``i`` sees ``i - window < j <= i`` (causal), so the union over ``[qs, qe)`` is
    ``[qs - window + 1, qe)``, clipped to ``[0, S)``.
    """
    if not causal:
        return 0, S
    lo = max(0, qs - window + 1) if window else 0
    return lo, max(lo, min(S, qe))


def visible_queries(ks: int, ke: int, T: int, causal: bool, window: int = 0) -> tuple[int, int]:
    """Query positions ``[lo, hi)`` that see at least one key of ``[ks, ke)`` (``lo == hi``: none).

    Key ``j`` is seen by ``j <= i < j + window`` (causal), so the union over ``[ks, ke)`` is
    ``[ks, ke - 1 + window)``, clipped to ``[0, T)``.
    """
    if not causal:
        return 0, T
    lo = min(ks, T)
    return lo, max(lo, min(T, ke - 1 + window) if window else T)


def _chunk_ranges(ids: Tensor, chunk_size: int) -> tuple[list, list]:
    """Per chunk of ``ids`` ``[B, T]``: one ``(lo, hi)`` range per batch row, and the rows'
    single ids when every row's chunk holds one value (else None)."""
    B, T = ids.shape
    n = -(-T // chunk_size)
    if n * chunk_size > T:
        # Pad the last chunk with its own last id: its min and max stay its own.
        ids = torch.cat([ids, ids[:, -1:].expand(B, n * chunk_size - T)], dim=1)
    lo, hi = ids.reshape(B, n, chunk_size).aminmax(dim=-1)
    lo, hi = torch.stack([lo, hi]).tolist()
    ranges = [tuple(zip(*rows)) for rows in zip(zip(*lo), zip(*hi))]
    single = [tuple(a for a, _ in r) if all(a == b for a, b in r) else None for r in ranges]
    return ranges, single


class Documents:
    """Document ids and their per-chunk ranges: what classifies chunk pairs of packed sequences.

    ``segment_ids`` ``[B, T]`` (int), one chunking for queries and keys (``T == S``); the keys'
    ids are ``key_segment_ids`` ``[B, S]`` when given (padding), else ``segment_ids``. Built
    once per call, ``O(T)``: the min and max id of every chunk of every batch row, read to the
    host with one ``.tolist()`` per side (``2·B·⌈T/chunk⌉`` numbers). A pair of chunks then
    costs ``O(B)`` comparisons to classify, no tensor work. Query chunks are classified by
    the query ids' ranges, key chunks by the key ids'.
    """

    def __init__(self, segment_ids: Tensor, chunk_size: int, key_segment_ids: Tensor | None = None):
        self.segment_ids = segment_ids
        self.key_segment_ids = key_segment_ids
        self.chunk_size = chunk_size
        #: Per chunk, one (lo, hi) range per batch row; per chunk, the rows' single ids when
        #: every row's chunk is one document, else None (queries, then keys).
        self._ranges, self._single = _chunk_ranges(segment_ids, chunk_size)
        if key_segment_ids is None:
            self._key_ranges, self._key_single = self._ranges, self._single
        else:
            self._key_ranges, self._key_single = _chunk_ranges(key_segment_ids, chunk_size)

    @classmethod
    def of(cls, segment_ids: Tensor | None, chunk_size: int, key_segment_ids: Tensor | None = None) -> "Documents | None":
        """``Documents`` for the ids, or None without them."""
        return None if segment_ids is None else cls(segment_ids, chunk_size, key_segment_ids)

    @property
    def keys(self) -> Tensor:
        """The keys' ids ``[B, S]``: ``key_segment_ids`` when given, else ``segment_ids``."""
        return self.segment_ids if self.key_segment_ids is None else self.key_segment_ids

    def meet(self, qs: int, ks: int) -> bool:
        """Whether some query of the chunk at ``qs`` and key of the chunk at ``ks`` can share a
        document: their id ranges intersect in some batch row. False: the pair is skipped."""
        a, b = self._ranges[qs // self.chunk_size], self._key_ranges[ks // self.chunk_size]
        return any(lq <= hk and lk <= hq for (lq, hq), (lk, hk) in zip(a, b))

    def one_document(self, qs: int, ks: int) -> bool:
        """Whether every row's query ids in the one chunk and key ids in the other are one and
        the same value: documents mask nothing."""
        a = self._single[qs // self.chunk_size]
        return a is not None and a == self._key_single[ks // self.chunk_size]

    def keep(self, qs: int, qe: int, ks: int, ke: int, groups: int) -> Tensor:
        """``[B, 1, G·Cq, Ck]`` boolean: query and key in one document (rows as :func:`_group_rows`)."""
        return same_document(self.segment_ids, qs, qe, ks, ke, self.key_segment_ids).repeat(1, groups, 1).unsqueeze(1)


def rows_see_keys(segment_ids: Tensor, key_segment_ids: Tensor | None, causal: bool, window: int = 0) -> Tensor:
    """``[B, T]`` boolean: query ``i`` of row ``b`` sees some key (ids equal, in the band).

    Exact for any ids, ``O(B·T·log(B·T))``: the (query and key) ids are ranked densely, every
    key gets the code ``(b·U + rank)·T + j``, and the codes are sorted once. A query ``i``
    with id rank ``r`` looks up the largest key code ``≤ (b·U + r)·T + i`` (causal): it is a
    matching key iff it lies in the same ``(b, r)`` group, and then it is the nearest matching
    key at or before ``i``, which a window ``w`` also needs within ``i - w < j``. Without
    causal, the smallest code ``≥ (b·U + r)·T`` decides. Keys use ``segment_ids`` when
    ``key_segment_ids`` is None (every row then sees its own key when causal or not).
    """
    keys = segment_ids if key_segment_ids is None else key_segment_ids
    B, T = segment_ids.shape
    if B * T == 0:
        return torch.ones((B, T), dtype=torch.bool, device=segment_ids.device)
    _, rank = torch.unique(torch.cat([segment_ids.long(), keys.long()], dim=1), return_inverse=True)
    U = int(rank.max()) + 1
    base = (torch.arange(B, device=rank.device).view(B, 1) * U + rank) * T
    pos = torch.arange(T, device=rank.device).view(1, T)
    q_group, k_codes = base[:, :T].contiguous(), (base[:, T:] + pos).flatten().sort().values
    if causal:
        at = torch.searchsorted(k_codes, q_group + pos, right=True) - 1
        found = k_codes[at.clamp_min(0)]
        sees = (at >= 0) & (found >= q_group)
        if window:
            sees &= (q_group + pos) - found < window
    else:
        at = torch.searchsorted(k_codes, q_group).clamp_max(k_codes.numel() - 1)
        found = k_codes[at]
        sees = (found >= q_group) & (found < q_group + T)
    return sees


def _band_needs_mask(qs: int, qe: int, ks: int, ke: int, causal: bool, window: int) -> bool:
    # Some key right of a query, or with a window some key ``window`` or more left of one.
    return causal and (ke - 1 > qs or (window > 0 and ks <= qe - 1 - window))


def pair_needs_mask(qs: int, qe: int, ks: int, ke: int, causal: bool, window: int = 0,
                    documents: Documents | None = None) -> bool:
    """Whether a computed chunk pair has masked entries: some key right of a query
    (``ke - 1 > qs``), or with a window some key ``window`` or more left of one
    (``ks <= qe - 1 - window``), or with documents some query and key in different
    documents (not :meth:`Documents.one_document`). A pair without any runs unmasked."""
    return _band_needs_mask(qs, qe, ks, ke, causal, window) or (documents is not None and not documents.one_document(qs, ks))


def chunk_schedule(T: int, S: int, chunk_size: int, causal: bool, *, kv_outer: bool = False, window: int = 0,
                   documents: Documents | None = None):
    """The chunk pairs that carry work, grouped by the outer chunk.

    Yields ``((os, oe), [(is, ie), ...])``: an outer chunk and the inner chunks paired with it,
    in order. Forward order is query-outer/key-inner (``kv_outer=False``); backward order is
    key-outer/query-inner, so a key chunk's ``dk``/``dv`` are final after its inner loop. A
    causal pair is skipped when no query of it sees a key of it: its first key ``ks`` is right
    of its last query (``ks > qe - 1``), or with a window its last key is ``window`` or more
    left of its first query (``ke - 1 <= qs - window``). The inner chunks are the ones that
    meet :func:`visible_keys` (:func:`visible_queries`), found by index arithmetic: with a
    window the loop runs ``O(outer chunks · (window / chunk + 2))`` times, not over every pair.
    With ``documents`` (built for this ``chunk_size``) a pair inside the band is also skipped
    when no batch row's id ranges of its two chunks meet (:meth:`Documents.meet`), so no
    query can share a document with any key of it.
    """
    def chunks(outer: int, lo: int, hi: int, n: int) -> list[tuple[int, int]]:
        # The chunks of [0, n) that meet positions [lo, hi) (and the outer chunk's documents:
        # Documents.meet takes the query chunk first, the key chunk second).
        if lo >= hi:
            return []
        found = [(s, min(s + chunk_size, n)) for s in range((lo // chunk_size) * chunk_size, hi, chunk_size)]
        if documents is None:
            return found
        return [c for c in found if (documents.meet(c[0], outer) if kv_outer else documents.meet(outer, c[0]))]

    if kv_outer:
        for ks in range(0, S, chunk_size):
            ke = min(ks + chunk_size, S)
            yield (ks, ke), chunks(ks, *visible_queries(ks, ke, T, causal, window), T)
    else:
        for qs in range(0, T, chunk_size):
            qe = min(qs + chunk_size, T)
            yield (qs, qe), chunks(qs, *visible_keys(qs, qe, S, causal, window), S)


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


def _pair_keep(qs: int, qe: int, ks: int, ke: int, groups: int, device, causal: bool, window: int,
               documents: Documents | None = None) -> Tensor | None:
    """Boolean keep-mask for a chunk pair, or None when nothing is masked (:func:`pair_needs_mask`).

    The band (``i - window < j <= i``) is ``[G·Cq, Ck]``; with documents the same-document
    mask ``[B, 1, G·Cq, Ck]`` is ANDed in (both broadcast against ``[B, Hkv, G·Cq, Ck]``).
    """
    keep = None
    if _band_needs_mask(qs, qe, ks, ke, causal, window):
        qpos = torch.arange(qs, qe, device=device).repeat(groups).unsqueeze(1)
        kpos = torch.arange(ks, ke, device=device).unsqueeze(0)
        keep = kpos <= qpos
        if window:
            keep &= kpos > qpos - window
    if documents is not None and not documents.one_document(qs, ks):
        same = documents.keep(qs, qe, ks, ke, groups)
        keep = same if keep is None else same & keep
    return keep


def merge_partial(out: Tensor, lse: Tensor, out_part: Tensor, lse_part: Tensor) -> tuple[Tensor, Tensor]:
    """Merge two normalised partial softmax results over disjoint key sets (in place on ``out``).

    ``out``/``out_part`` ``[..., R, D]``, ``lse``/``lse_part`` ``[..., R]``. With
    ``LSE' = logaddexp(LSE, lse_part)``:
    ``out ← e^{LSE − LSE'}·out + e^{lse_part − LSE'}·out_part``; returns ``(out, LSE')``.
    Both weights are ``≤ 1`` (nothing positive is exponentiated) and either side may be
    ``-inf`` (no key of that part visible, or every score ``-inf``): it then gets weight 0,
    and a row ``-inf`` on both sides stays ``(out, -inf)``. A nan or ``+inf`` lse on either
    side (a softmax row that reads a nan or an infinite score) gives a nan row, as softmax
    over the union would.

    Attention sinks: a result computed with ``sinks`` already holds the sink in its ``lse``
    (the sink is a key whose value is 0). To merge several partial key sets of one softmax
    with a sink, compute every part without ``sinks`` and add the sink once, to one part or to
    the merged result, with :func:`fold_sinks` (or compute exactly one part with ``sinks``).
    """
    new = torch.logaddexp(lse, lse_part)
    # Rows with no finite score on either side: shift by 0, so both weights are exp(-inf) = 0.
    shift = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    a = torch.exp(lse - shift).unsqueeze(-1)
    b = torch.exp(lse_part - shift).unsqueeze(-1)
    # Weighted sum (not out − b·(out − out_part)): an infinite value keeps its sign and
    # magnitude through the merge instead of turning into inf − inf.
    out.mul_(a).add_(b * out_part)
    return out, new


def fold_sinks(out: Tensor, lse: Tensor, sinks: Tensor) -> tuple[Tensor, Tensor]:
    """Add one sink logit per head to a result over a key set (in place on ``out``).

    ``out`` ``[B, Hq, R, D]``, ``lse`` ``[B, Hq, R]`` (normalised over the keys only),
    ``sinks`` ``[Hq]``. The sink is a key whose value is 0, so this is :func:`merge_partial`
    with ``out_part = 0``, ``lse_part = sinks[h]``: ``LSE' = logaddexp(lse, sink)``,
    ``out ← e^{lse − LSE'}·out``. Returns ``(out, LSE')``. A row with no visible key
    (``lse = -inf``) gets ``out = 0``, ``LSE' = sink``. The product is taken in ``lse``'s
    dtype and rounded once into ``out``'s.
    """
    sink = sinks.to(lse.dtype).view(1, -1, 1)
    new = torch.logaddexp(lse, sink)
    # Both sides -inf: shift by 0 so the weight is exp(-inf) = 0, not nan.
    shift = torch.where(new == float("-inf"), torch.zeros_like(new), new)
    out.copy_(out * torch.exp(lse - shift).unsqueeze(-1))
    return out, new


def sink_grad(lse: Tensor, delta: Tensor, sinks: Tensor) -> Tensor:
    """``dsinks[h] = −Σ_{b,i} exp(sinks[h] − lse[b,h,i]) · delta[b,h,i]`` in ``sinks``' dtype.

    ``lse`` ``[B, Hq, T]`` includes the sink; ``delta = rowsum(dout · out) − dlse`` (see
    README, "Attention sinks"): the sink is a key with value 0, so its score gradient is
    ``P_sink (dout · 0 − delta)``.
    """
    p_sink = torch.exp(sinks.to(lse.dtype).view(1, -1, 1) - lse)
    return -(p_sink * delta.to(lse.dtype)).sum(dim=(0, 2)).to(sinks.dtype)


def _pair_scores(
    qc: Tensor, kc: Tensor, scale: float, softcap: float, keep: Tensor | None, *, cap_grad: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Scores of a chunk pair and, for the backward, the soft-cap's derivative.

    ``qc`` ``[B, Hkv, R, D]``, ``kc`` ``[B, Hkv, Ck, D]`` → ``s`` ``[B, Hkv, R, Ck]``:
    ``scale·q·kᵀ``, capped to ``softcap·tanh(·/softcap)`` when ``softcap > 0``, then ``-inf``
    where ``keep`` is False. With ``cap_grad`` and a cap, also ``ds/ds_raw = 1 − tanh²``
    (a second block, ``None`` otherwise), which the backward multiplies into ``dS``.
    """
    s = torch.matmul(qc, kc.transpose(-1, -2)).mul_(scale)
    dcap = None
    if softcap:
        t = s.div_(softcap).tanh_()
        if cap_grad:
            dcap = 1 - t * t
        s = t.mul_(softcap)
    if keep is not None:
        s.masked_fill_(~keep, float("-inf"))
    return s, dcap


def _partial_attention(
    qc: Tensor, kc: Tensor, vc: Tensor, scale: float, keep: Tensor | None, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """Softmax attention of a query block over one key block: ``(out_part, lse_part)``.

    ``qc`` ``[B, Hkv, R, D]``, ``kc``/``vc`` ``[B, Hkv, Ck, D]`` → ``[B, Hkv, R, D]``, ``[B, Hkv, R]``.
    Rows with every key masked (or every score ``-inf``) give ``lse_part = -inf`` and
    ``out_part = 0``; a nan score makes its row nan, a ``+inf`` score too (``inf − inf``), as
    in softmax.
    """
    s, _ = _pair_scores(qc, kc, scale, softcap, keep)
    m = s.amax(dim=-1, keepdim=True)
    # A row with nothing visible has m = -inf; shifting by 0 instead makes its exp() 0, not
    # nan. Only -inf: a +inf maximum must give softmax's nan (inf − inf), and a nan stays.
    m = torch.where(m == float("-inf"), torch.zeros_like(m), m)
    p = torch.exp_(s.sub_(m))
    denom = p.sum(dim=-1, keepdim=True)
    out_part = torch.matmul(p, vc).div_(denom.clamp_min(torch.finfo(denom.dtype).tiny))
    lse_part = (m + torch.log(denom)).squeeze(-1)
    return out_part, lse_part


def out_like(q: Tensor) -> Tensor:
    """An uninitialised ``out`` in ``q``'s memory layout (``empty_like``'s preserve-format
    rule): what every path returns and the op's fake implementation promises. A ``q`` laid
    out ``[B, T, H, D]`` (as projections give it) then gives an ``out`` whose
    ``.transpose(1, 2)`` is contiguous, so the usual reshape after attention needs no copy."""
    return torch.empty_like(q, memory_format=torch.preserve_format)


def _empty_forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """An empty result (``B·Hq·T = 0``) or no keys (``S = 0``: ``out = 0``, ``lse = -inf``)."""
    B, Hq, T, D = q.shape
    out = out_like(q).zero_()
    lse = torch.full((B, Hq, T), float("-inf"), dtype=accumulation_dtype(q.dtype), device=q.device)
    return out, lse


def chunked_attention_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool,
    scale: float | None,
    chunk_size: int | None,
    softmax_nan: bool = False,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    segment_ids: Tensor | None = None,
    key_segment_ids: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact attention, one (query chunk, key chunk) pair at a time.

    Args:
        q: ``[B, Hq, T, D]``; any ``T >= 0`` (not only multiples of ``chunk_size``).
        k, v: ``[B, Hkv, S, D]``, ``Hq % Hkv == 0``, any ``S >= 0`` (``S = 0``: ``out = 0``,
            ``lse = -inf``).
        causal: SDPA's top-left causal mask (query ``i`` sees keys ``j <= i``).
        scale: score scale (any finite value, zero and negative included); ``None`` means
            ``1 / sqrt(D)``.
        chunk_size: rows of a query chunk and columns of a key chunk; None: chosen from the
            shapes at run time (:func:`auto_chunk_size`).
        softmax_nan: a row that sees keys but whose every score is ``-inf`` (infinite
            inputs) gets ``out = nan``, as softmax gives, instead of the partial-result
            convention ``out = 0`` (``lse`` is ``-inf`` either way). The op sets it; keep it
            off for a partial result that is merged with others (:func:`merge_partial`).
        window: with ``causal``, query ``i`` sees only keys ``i - window < j <= i`` (0: no
            window). Chunk pairs outside the band are skipped.
        softcap: scores ``s = scale·q·k`` become ``softcap·tanh(s / softcap)`` before
            masking and softmax (0: no cap).
        sinks: optional ``[Hq]`` logits, one per head, added to every row's softmax
            denominator (a key with value 0): ``P_ij = exp(s_ij) / (exp(sinks[h]) + Σ_j exp(s_ij))``.
        segment_ids: optional int32/int64 ``[B, T]`` document ids (needs ``T == S``): query
            ``i`` sees key ``j`` only if ``segment_ids[b, i] == segment_ids[b, j]`` (ANDed
            with causal and the window). Chunk pairs no query and key of which share a
            document are skipped (:class:`Documents`).
        key_segment_ids: optional int32/int64 ``[B, S]`` ids of the keys (needs
            ``segment_ids``): query ``i`` sees key ``j`` only if
            ``segment_ids[b, i] == key_segment_ids[b, j]``. None: the keys' ids are
            ``segment_ids``.
    Returns:
        ``out`` ``[B, Hq, T, D]`` in the input dtype and ``lse`` ``[B, Hq, T]`` in the
        accumulation dtype (float32 for 16/32-bit inputs, float64 for float64). With
        ``sinks``, ``lse = log(exp(sinks[h]) + Σ_j exp(s_ij))`` **includes** the sink, so
        ``out_i = Σ_j exp(s_ij − lse_i) v_j`` holds as without sinks and the backward needs
        nothing else. A caller merging partial key sets (:func:`merge_partial`) computes the
        parts without ``sinks`` and adds the sink once (:func:`fold_sinks`). With a window,
        rows that see no key (``i >= S - 1 + window``) give ``out = 0``, ``lse = -inf``
        (``lse = sinks[h]`` with sinks); so do rows that ``key_segment_ids`` leave without a
        key (SDPA's rule for an all-False boolean mask row), ``softmax_nan`` or not.
    """
    scale = check_arguments(q, k, v, causal, scale, chunk_size, "chunked_attention_forward",
                            window=window, softcap=softcap, sinks=sinks, segment_ids=segment_ids,
                            key_segment_ids=key_segment_ids)
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    if B * Hq * T == 0 or S == 0:
        out, lse = _empty_forward(q, k, v)
        return (out, lse) if sinks is None else fold_sinks(out, lse, sinks)
    # ATen's kernel knows no cap; a sink is folded in after it; with a band or documents it
    # serves the pairs they do not cut (:func:`_kernel_serves`), the others are masked torch pairs.
    # (A band with T != S may leave rows without keys: those need the generic path's rule.)
    fast = not softcap and (not window or T == S) and cpu_kernel_applies(q, k, v, causal=causal, scale=scale, chunk_size=chunk_size)
    chunk = auto_chunk_size(q, k, fast=fast and segment_ids is None, window=window) if chunk_size is None else chunk_size
    documents = Documents.of(segment_ids, chunk, key_segment_ids)
    if fast:
        out, lse = _forward_cpu_kernel(q, k, v, causal, scale, chunk, documents, window)
        # ATen's kernel is only used on finite inputs whose scores cannot overflow: no row
        # that sees a key can be -inf there, so softmax_nan has nothing to do (rows that see
        # none, with key ids, come out of masked torch pairs as out = 0, lse = -inf).
        return (out, lse) if sinks is None else fold_sinks(out, lse, sinks)
    G = Hq // Hkv
    acc = accumulation_dtype(q.dtype)
    out = out_like(q)
    lse = torch.empty((B, Hq, T), dtype=acc, device=q.device)
    for (qs, qe), key_chunks in chunk_schedule(T, S, chunk, causal, window=window, documents=documents):
        qc = _group_rows(q, qs, qe, Hkv, acc)
        o_acc = lse_acc = None
        for ks, ke in key_chunks:
            keep = _pair_keep(qs, qe, ks, ke, G, q.device, causal, window, documents)
            o_part, l_part = _partial_attention(qc, k[:, :, ks:ke].to(acc), v[:, :, ks:ke].to(acc), scale, keep, softcap)
            if o_acc is None:
                o_acc, lse_acc = o_part, l_part
            else:
                o_acc, lse_acc = merge_partial(o_acc, lse_acc, o_part, l_part)
        if o_acc is None:
            # A window's rows past the last key, or rows whose key ids leave them no key in
            # any pair (the whole chunk skipped), see none: out = 0, lse = -inf.
            o_acc = torch.zeros_like(qc)
            lse_acc = torch.full(qc.shape[:3], float("-inf"), dtype=acc, device=q.device)
        o_acc, lse_acc = _ungroup_rows(o_acc, Hq, qe - qs), _ungroup_rows(lse_acc, Hq, qe - qs)
        if sinks is not None:
            # In the accumulation dtype, before out's single rounding.
            o_acc, lse_acc = fold_sinks(o_acc, lse_acc, sinks)
        out[:, :, qs:qe] = o_acc
        lse[:, :, qs:qe] = lse_acc
    if softmax_nan:
        # lse = -inf in a row that sees some key means every visible score was -inf (and no
        # sink): softmax divides 0 by 0 there. Without a window every row sees key 0 (with
        # documents: its own key); with key ids a row may see none (SDPA's out = 0 then).
        empty = lse == float("-inf")
        if window:
            empty[:, :, S - 1 + window:] = False
        if key_segment_ids is not None and bool(empty.any()):
            empty &= rows_see_keys(segment_ids, key_segment_ids, causal, window).unsqueeze(1)
        out.masked_fill_(empty.unsqueeze(-1), float("nan"))
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
    chunk_size: int | None,
    dlse: Tensor | None = None,
    window: int = 0,
    softcap: float = 0.0,
    sinks: Tensor | None = None,
    segment_ids: Tensor | None = None,
    key_segment_ids: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """Gradients of :func:`chunked_attention_forward`, recomputing probabilities from ``lse``.

    Loop order as in FPDT: outer over key/value chunks (their ``dk``/``dv`` are final at the
    end of the outer step), inner over query chunks; pairs outside the causal band, or
    whose chunks share no document, are skipped. With ``s_ij`` the (capped) score, ``P_ij = exp(s_ij − lse_i)`` and
    ``delta_i = Σ_d dout_i·out_i − dlse_i``: ``dv_j = Σ_i P_ij dout_i``,
    ``dS_ij = P_ij (dout_i·v_j − delta_i) · c'_ij`` (``c' = 1 − tanh²`` of the soft-cap,
    1 without), ``dq_i = scale Σ_j dS_ij k_j``, ``dk_j = scale Σ_i dS_ij q_i`` (GQA: sums run
    over the query heads of a group too), and with sinks
    ``dsinks[h] = −Σ_{b,i} exp(sinks[h] − lse_i) delta_i``.

    Args:
        dout: ``[B, Hq, T, D]`` gradient of ``out``.
        q, k, v, out, lse: as in / returned by :func:`chunked_attention_forward` (``lse``
            includes the sink when ``sinks`` is given).
        chunk_size: as there (None: chosen from the shapes; need not match the forward's).
        dlse: optional ``[B, Hq, T]`` gradient of ``lse`` (``None`` = zero).
        window, softcap, sinks, segment_ids, key_segment_ids: as given to the forward. Rows
            that see no key (``lse = -inf``, or the sink) get ``dq = 0`` and add nothing to
            ``dk``/``dv``.
    Returns:
        ``(dq, dk, dv)`` shaped and typed like ``q``, ``k``, ``v`` — and ``dsinks`` ``[Hq]``
        (``sinks``' dtype) as a fourth element when ``sinks`` is given; ``dq`` is accumulated
        in the accumulation dtype and cast once at the end.
    """
    scale = check_arguments(q, k, v, causal, scale, chunk_size, "chunked_attention_backward",
                            window=window, softcap=softcap, sinks=sinks, segment_ids=segment_ids,
                            key_segment_ids=key_segment_ids)
    if dout.shape != q.shape or out.shape != q.shape:
        raise ValueError(f"chunked_attention_backward: dout {tuple(dout.shape)} and out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if lse.shape != q.shape[:3]:
        raise ValueError(f"chunked_attention_backward: lse must be [B, Hq, T] = {list(q.shape[:3])}, got {tuple(lse.shape)}")
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)

    def with_sink_grad(grads: tuple[Tensor, Tensor, Tensor], delta: Tensor | None) -> tuple[Tensor, ...]:
        if sinks is None:
            return grads
        if delta is None:
            delta = _delta(dout, out, dlse, max(T, 1), acc)
        return (*grads, sink_grad(lse, delta, sinks))

    if B * Hq * T == 0 or S == 0:
        # No query reads a key: every gradient is zero (and empty where its tensor is).
        return with_sink_grad((torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)), None)
    if dlse is not None and dlse.device.type == "cpu" and not bool(dlse.any()):
        # AOTAutograd hands the op a zero tangent for an lse nobody reads; it changes nothing,
        # and dropping it keeps the fast path (which has no input for d(lse)) available.
        dlse = None
    # Given the sink-inclusive lse and out, ATen's kernel computes dq, dk, dv exactly.
    fast = dlse is None and not softcap and (not window or T == S) and cpu_kernel_applies(
        q, k, v, causal=causal, scale=scale, dout=dout, chunk_size=chunk_size)
    chunk = auto_chunk_size(q, k, fast=fast and segment_ids is None, window=window) if chunk_size is None else chunk_size
    documents = Documents.of(segment_ids, chunk, key_segment_ids)
    # A window's rows past the last key (and rows key ids leave without a key) have
    # lse = -inf and only masked scores in the pairs their chunk computes: shift them by 0 so
    # P = exp(-inf) = 0, not nan. (With sinks their lse is the sink: P = 0 already.)
    lse_rows = lse.masked_fill(lse == float("-inf"), 0.0) if window or key_segment_ids is not None else lse
    if fast:
        return with_sink_grad(_backward_cpu_kernel(dout, q, k, v, out, lse, causal, scale, chunk, documents, window, lse_rows),
                              None)
    G = Hq // Hkv
    delta = _delta(dout, out, dlse, chunk, acc)
    dq_acc = torch.zeros((B, Hq, T, D), dtype=acc, device=q.device)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    for (ks, ke), query_chunks in chunk_schedule(T, S, chunk, causal, kv_outer=True, window=window, documents=documents):
        kc = k[:, :, ks:ke].to(acc)
        vc = v[:, :, ks:ke].to(acc)
        dk_acc = torch.zeros((B, Hkv, ke - ks, D), dtype=acc, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        for qs, qe in query_chunks:
            keep = _pair_keep(qs, qe, ks, ke, G, q.device, causal, window, documents)
            _pair_backward(q, dout, lse_rows, delta, kc, vc, qs, qe, keep, scale, softcap, dq_acc, dk_acc, dv_acc)
        dk[:, :, ks:ke] = dk_acc
        dv[:, :, ks:ke] = dv_acc
    return with_sink_grad((dq_acc.to(q.dtype), dk, dv), delta)


def _pair_backward(q: Tensor, dout: Tensor, lse: Tensor, delta: Tensor, kc: Tensor, vc: Tensor, qs: int, qe: int,
                   keep: Tensor | None, scale: float, softcap: float, dq_acc: Tensor, dk_acc: Tensor, dv_acc: Tensor) -> None:
    """Add one chunk pair's gradient terms to the accumulators, in the torch path.

    ``q``/``dout`` ``[B, Hq, T, D]``, ``lse``/``delta`` ``[B, Hq, T]`` (whole sequences; the
    query chunk ``[qs, qe)`` is read from them), ``kc``/``vc`` ``[B, Hkv, Ck, D]`` in the
    accumulation dtype, ``keep`` as :func:`_pair_keep` gives it. Adds into ``dq_acc``
    ``[B, Hq, T, D]`` and the key chunk's ``dk_acc``/``dv_acc`` ``[B, Hkv, Ck, D]``.
    """
    Hq, Hkv, acc = q.shape[1], kc.shape[1], kc.dtype
    qc = _group_rows(q, qs, qe, Hkv, acc)
    doc = _group_rows(dout, qs, qe, Hkv, acc)
    lsec = _group_rows(lse, qs, qe, Hkv, acc).unsqueeze(-1)
    deltac = _group_rows(delta, qs, qe, Hkv, acc).unsqueeze(-1)
    s, dcap = _pair_scores(qc, kc, scale, softcap, keep, cap_grad=True)
    p = torch.exp_(s.sub_(lsec))
    dv_acc += torch.matmul(p.transpose(-1, -2), doc)
    ds = torch.matmul(doc, vc.transpose(-1, -2)).sub_(deltac).mul_(p)
    # Two score blocks live (three with a soft-cap), not more: p is dropped before the
    # products of ds are allocated.
    del s, p
    if dcap is not None:
        ds.mul_(dcap)
    dk_acc += torch.matmul(ds.transpose(-1, -2), qc).mul_(scale)
    dq_acc[:, :, qs:qe] += _ungroup_rows(torch.matmul(ds, kc).mul_(scale), Hq, qe - qs)


# ----------------------------------------------------------------------------------------
# CPU fast path: the same chunk schedule, each chunk pair computed by ATen's CPU flash
# attention kernel (vectorised C++, already tiled internally) instead of matmul + exp in
# Python-level torch ops (about 3x faster for T = 2K, chunk 512 on a 2-core CPU). A pair is
# either fully visible or the aligned diagonal block (T == S, equal chunking), which the
# kernel's own top-left causal mask covers exactly.
#
# Where the kernel is exact, and where it is not (found by testing it against the float64
# reference; see cpu_kernel_applies):
# * causal with a scale <= 0: the kernel fills masked scores with -inf *before* scaling, so
#   -inf · (negative) = +inf and -inf · 0 = nan poison every row (eager SDPA inherits this);
# * non-finite inputs, or scores large enough to overflow: its vectorised max does not
#   propagate nan (a nan key can vanish from the rows that read it) and its masking and
#   merging of infinities differ from softmax's;
# * causal with T != S over several chunk pairs: its mask is aligned per call, not at the
#   absolute positions of a chunk pair (one call over the whole problem is SDPA's top-left);
# * a nonzero d(lse): the backward kernel has no input for it.
# Everything else (any positive or negative non-causal scale, zero included; T != S without
# causal; GQA; any chunk) matches the reference to float64 round-off.
#
# Exactness of the per-pair backward: the kernel recomputes P = exp(scale·q·kᵀ − lse) and
# delta = rowsum(dout·out) from what it is given. Given the *global* out and lse rows of the
# query chunk, P is the global probability block and delta the global delta, so its
# (dq, dk, dv) are exactly this pair's terms of the sums; we add them up.
# ----------------------------------------------------------------------------------------

#: Switch for the CPU fast path (tests run both paths).
USE_CPU_KERNEL = True


def _abs_max(t: Tensor) -> float:
    """``max |t|`` as a Python float (nan if ``t`` holds a nan, inf if an infinity).

    ``aminmax`` reads ``t`` once and allocates two scalars (``t.abs()`` would copy ``t``).
    """
    if not t.numel():
        return 0.0
    lo, hi = torch.aminmax(t.detach())
    lo, hi = float(lo), float(hi)
    if math.isnan(lo) or math.isnan(hi):
        return math.nan
    return max(-lo, hi)


def cpu_kernel_applies(
    q: Tensor, k: Tensor, v: Tensor, *, causal: bool, scale: float, dout: Tensor | None = None, chunk_size: int | None = None,
) -> bool:
    """Whether ATen's CPU flash kernel computes this call exactly (see the comment above).

    It does for CPU tensors with ``T, S >= 1`` when: ``scale > 0`` or not causal; ``T == S``
    or a single chunk pair (``chunk_size`` None, or ``>= T, S``) if causal; every input
    finite, and no score (``|scale|·D·max|q|·max|k|``) nor, in backward, ``dout·v`` product
    able to overflow the accumulation dtype. Checking costs one pass over the inputs,
    ``O((T + S)·D)``, against attention's ``O(T·S·D)``.
    """
    if not (USE_CPU_KERNEL and q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")):
        return False
    T, S, D = q.shape[2], k.shape[2], q.shape[3]
    if q.numel() == 0 or k.numel() == 0:
        return False
    if causal and not scale > 0:
        return False
    # With T != S the kernel's top-left mask is SDPA's only for the whole problem in one call
    # (auto chunking makes it one pair); chunk pairs off the diagonal would need offsets.
    if causal and T != S and not (chunk_size is None or (T <= chunk_size and S <= chunk_size)):
        return False
    # Half of the largest finite value: sums of D products and the kernel's own rescaling
    # stay finite below it. Python floats (doubles) overflow to inf, which fails the test.
    limit = torch.finfo(accumulation_dtype(q.dtype)).max / 2
    qm, km, vm = _abs_max(q), _abs_max(k), _abs_max(v)
    if not abs(scale) * D * qm * km <= limit or not vm <= limit:
        return False
    if dout is not None and not D * _abs_max(dout) * vm <= limit:
        return False
    return True


def _pair_is_diagonal(qs: int, qe: int, ks: int, ke: int, causal: bool) -> bool:
    if not causal or ke - 1 <= qs:
        return False
    # With T == S and one chunking for both, a partly masked pair is the aligned diagonal block.
    assert (qs, qe) == (ks, ke), "partly masked chunk pair off the diagonal"
    return True


def _kernel_serves(qs: int, qe: int, ks: int, ke: int, window: int, documents: Documents | None) -> bool:
    """Whether ATen's kernel computes this chunk pair exactly: neither the documents nor the
    band cut it (the causal diagonal the kernel masks itself)."""
    return (documents is None or documents.one_document(qs, ks)) and not (window > 0 and ks <= qe - 1 - window)


#: Sub-blocks per chunk side for a pair on a band's edge (:func:`_edge_blocks`).
EDGE_SPLIT = 4


def _edge_blocks(qs: int, qe: int, ks: int, ke: int, chunk_size: int, window: int, documents: Documents | None):
    """A chunk pair the band's edge cuts, as sub-blocks for the CPU kernel path, or None.

    The band ``i − w < j ≤ i`` crosses such a pair along a diagonal: split into ``EDGE_SPLIT``
    × ``EDGE_SPLIT`` blocks of ``chunk_size / EDGE_SPLIT``, about half of them lie wholly
    inside the band (ATen's kernel computes them), those wholly outside are skipped, and only
    the blocks on the diagonal need the masked torch pair: the pair costs about the kernel's
    time for one pair instead of the masked pair's twice that. Yields
    ``((a, b), [(c, e), ...])`` per query sub-block with its visible key sub-blocks (at most one
    is cut). Pairs holding several documents, or chunks too small to split, are left whole.
    """
    sub = chunk_size // EDGE_SPLIT
    if not window or documents is not None or chunk_size % EDGE_SPLIT or sub < 16:
        return None
    blocks = []
    for a in range(qs, qe, sub):
        b = min(a + sub, qe)
        keys = [(c, min(c + sub, ke)) for c in range(ks, ke, sub)]
        blocks.append(((a, b), [(c, e) for c, e in keys if c <= b - 1 and e - 1 > a - window]))
    return blocks


def _forward_cpu_kernel(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, chunk_size: int,
                        documents: Documents | None = None, window: int = 0) -> tuple[Tensor, Tensor]:
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    if T <= chunk_size and S <= chunk_size and _kernel_serves(0, T, 0, S, window, documents):
        # One chunk pair: the kernel's own result, as eager SDPA's call returns it (no copy
        # when q is laid out densely: the kernel's out then has q's layout too).
        o, l = flash(q, k, v, 0.0, causal, scale=scale)
        out = o if o.stride() == out_like(q).stride() else out_like(q).copy_(o)
        return out, l.to(acc).contiguous()
    out = out_like(q)
    lse = torch.empty((B, Hq, T), dtype=acc, device=q.device)
    for (qs, qe), key_chunks in chunk_schedule(T, S, chunk_size, causal, window=window, documents=documents):
        # One key chunk: nothing to merge, so the kernel runs in the input dtype (fp32
        # accumulation inside, as eager SDPA's own call) without fp32 copies of q/k/v. With
        # several, 16-bit inputs are merged in float32: the kernel would round each partial.
        dtype = q.dtype if len(key_chunks) == 1 else acc
        qc = q[:, :, qs:qe].to(dtype)
        o_acc = lse_acc = None
        def pair(a: int, b: int, c: int, e: int) -> tuple[Tensor, Tensor]:
            """Queries ``[a, b)`` (inside ``[qs, qe)``) against keys ``[c, e)``: the kernel where
            it serves, else the masked torch pair in the accumulation dtype."""
            if _kernel_serves(a, b, c, e, window, documents):
                diagonal = _pair_is_diagonal(a, b, c, e, causal)
                return flash(qc[:, :, a - qs:b - qs], k[:, :, c:e].to(dtype), v[:, :, c:e].to(dtype), 0.0, diagonal, scale=scale)
            keep = _pair_keep(a, b, c, e, Hq // Hkv, q.device, causal, window, documents)
            o_p, l_p = _partial_attention(_group_rows(qc, a - qs, b - qs, Hkv, acc), k[:, :, c:e].to(acc), v[:, :, c:e].to(acc), scale, keep)
            return _ungroup_rows(o_p, Hq, b - a), _ungroup_rows(l_p, Hq, b - a)

        for ks, ke in key_chunks:
            edge = None if _kernel_serves(qs, qe, ks, ke, window, documents) else _edge_blocks(qs, qe, ks, ke, chunk_size, window, documents)
            if edge is None:
                o_part, l_part = pair(qs, qe, ks, ke)
            else:
                # The band's edge: its sub-blocks, merged row block by row block.
                o_part = qc.new_zeros(qc.shape, dtype=acc)
                l_part = torch.full(qc.shape[:3], float("-inf"), dtype=acc, device=q.device)
                for (a, b), blocks in edge:
                    for c, e in blocks:
                        o_p, l_p = pair(a, b, c, e)
                        rows = slice(a - qs, b - qs)  # merge_partial updates the out view in place
                        _, l_part[:, :, rows] = merge_partial(o_part[:, :, rows], l_part[:, :, rows], o_p.to(acc), l_p.to(acc))
            if o_acc is None:
                o_acc, lse_acc = o_part, l_part.to(acc)
            else:
                o_acc, lse_acc = merge_partial(o_acc, lse_acc, o_part, l_part.to(acc))
        if o_acc is None:
            # Key ids leave every row of the chunk without a key: out = 0, lse = -inf.
            out[:, :, qs:qe] = 0
            lse[:, :, qs:qe] = float("-inf")
            continue
        out[:, :, qs:qe] = o_acc
        lse[:, :, qs:qe] = lse_acc
    return out, lse


def _backward_cpu_kernel(dout, q, k, v, out, lse, causal: bool, scale: float, chunk_size: int,
                         documents: Documents | None = None, window: int = 0,
                         lse_rows: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    # ``lse_rows``: ``lse`` with the rows that see no key shifted to 0, for the masked torch
    # pairs (the only pairs such rows take part in); None: ``lse``.
    lse_rows = lse if lse_rows is None else lse_rows
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    acc = accumulation_dtype(q.dtype)
    flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    if T <= chunk_size and S <= chunk_size and _kernel_serves(0, T, 0, S, window, documents):
        # One chunk pair: the kernel's own gradients, in the input dtype (fp32 inside).
        grads = flash_bwd(dout, q, k, v, out, lse.contiguous(), 0.0, causal, scale=scale)
        return tuple(g.contiguous() for g in grads)
    dq_acc = torch.zeros((B, Hq, T, D), dtype=acc, device=q.device)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    # Pairs the documents or the band cut run the torch pair, which reads delta (the kernel
    # computes its own from out).
    delta = None if documents is None and not window else _delta(dout, out, None, chunk_size, acc)
    for (ks, ke), query_chunks in chunk_schedule(T, S, chunk_size, causal, kv_outer=True, window=window, documents=documents):
        kc, vc = k[:, :, ks:ke].to(acc), v[:, :, ks:ke].to(acc)
        dk_acc = torch.zeros((B, Hkv, ke - ks, D), dtype=acc, device=q.device)
        dv_acc = torch.zeros_like(dk_acc)
        def pair(a: int, b: int, c: int, e: int) -> None:
            """Queries ``[a, b)`` against keys ``[c, e)`` (inside ``[ks, ke)``): the kernel where it
            serves (with the final out, lse its terms are exact), else the masked torch pair."""
            kv = slice(c - ks, e - ks)
            if not _kernel_serves(a, b, c, e, window, documents):
                keep = _pair_keep(a, b, c, e, Hq // Hkv, q.device, causal, window, documents)
                _pair_backward(q, dout, lse_rows, delta, kc[:, :, kv], vc[:, :, kv], a, b, keep, scale, 0.0,
                               dq_acc, dk_acc[:, :, kv], dv_acc[:, :, kv])
                return
            dq_p, dk_p, dv_p = flash_bwd(
                dout[:, :, a:b].to(acc), q[:, :, a:b].to(acc), kc[:, :, kv], vc[:, :, kv],
                out[:, :, a:b].to(acc), lse[:, :, a:b].contiguous(), 0.0, _pair_is_diagonal(a, b, c, e, causal), scale=scale,
            )
            dq_acc[:, :, a:b] += dq_p
            dk_acc[:, :, kv] += dk_p
            dv_acc[:, :, kv] += dv_p

        for qs, qe in query_chunks:
            edge = None if _kernel_serves(qs, qe, ks, ke, window, documents) else _edge_blocks(qs, qe, ks, ke, chunk_size, window, documents)
            for (a, b), blocks in edge or [((qs, qe), [(ks, ke)])]:
                for c, e in blocks:
                    pair(a, b, c, e)
        dk[:, :, ks:ke] = dk_acc
        dv[:, :, ks:ke] = dv_acc
    return dq_acc.to(q.dtype), dk, dv
