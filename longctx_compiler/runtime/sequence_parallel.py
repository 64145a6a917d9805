"""Sequence parallelism: ``P`` ranks share one sequence, each holding a contiguous shard of it.

Layout. A sequence of ``T`` tokens is padded at its end to ``P·L`` tokens, ``L = ⌈T / P⌉``
(at least 2: a one-token shard would make the compiler specialise the length to 1). The
padding is exact to add: attention is causal, so no real token reads a padded one, and padded
labels are ignored by the loss. Which ``L`` tokens a rank holds is one of two layouts:

* **contiguous** (default): rank ``r`` holds tokens ``[r·L, (r+1)·L)``. Scans and
  convolutions need it (a shard's start state and halo come from the previous rank).
* **chunk-interleaved** (FPDT's, with sequence-pipelined layers, chunk ``Q``): the sequence
  is cut into groups of ``P`` chunks; rank ``r`` holds the ``r``-th chunk of every group, so
  its local chunk ``c`` is global ``[c·P·Q + r·n_c, … + n_c)`` with ``n_c = min(Q, L − c·Q)``
  (the last group is split evenly). A pipelined layer's all-to-all of its local chunk ``c``
  then gives every rank the whole group ``c`` — ``P·n_c`` consecutive tokens — for its heads,
  and everything before it is the K/V history: FPDT's chunk pipeline, over ``P`` ranks
  (:func:`shard_positions`).

What runs where:

* :func:`shard_inputs` (called by the optimized model on every rank, with the same full batch):
  checks the ranks really got the same batch, pads and slices every sequence input, and for a
  Hugging Face causal LM turns ``labels`` into ``shift_labels`` (transformers' own convention
  for sharded sequences: the label shift is taken on the whole sequence, so the last token of
  shard ``r`` predicts the first token of shard ``r + 1``) and ``num_items_in_batch`` (the
  global count of labelled tokens, so each shard's loss is its part of the global mean).
* ``longctx::seq_all_to_all`` (inserted around each attention by
  :mod:`longctx_compiler.passes.sequence_parallel`): Ulysses' all-to-all between
  sequence-sharded ``[B, H, L, D]`` and head-sharded ``[B, H/P, P·L, D]`` tensors; its
  gradient is the inverse all-to-all.
* ``longctx::seq_all_reduce``: the global loss from the shards' parts; its gradient is the
  identity (each shard's part enters the global sum once).
* :func:`reduce_gradients_over`: a hook on each parameter sums its gradient over the group
  as autograd produces it, before it is accumulated into ``.grad`` — so gradient accumulation
  and data parallelism over other ranks (DDP, FSDP) compose unchanged.

Communication per attention layer and step, per rank: forward ``(q + k + v + out)·(P−1)/P``
elements of the rank's shard (k, v after GQA replication to ``P`` heads when ``H_kv < P``),
backward the same again (:func:`all_to_all_elements`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SequenceParallelError", "SequenceGroup", "sequence_group", "get_group", "active_group", "current_group",
    "simulated_group", "shard_inputs", "global_loss", "reduce_gradients_over", "all_to_all_elements",
    "scan_exchange_elements", "communication", "reset_communication", "IGNORE_INDEX", "shard_positions",
    "interleaved_to_sequence", "sequence_to_interleaved",
]

#: The label value the loss ignores (transformers' and PyTorch's default).
IGNORE_INDEX = -100


class SequenceParallelError(ValueError):
    """Sequence parallelism cannot run this model or this call exactly (the message says why)."""


@dataclass(frozen=True)
class SequenceGroup:
    """The ranks that share one sequence.

    Attributes:
        size: ``P``.
        rank: this rank's index in the group (its shard).
        group: the ``torch.distributed`` process group of the ``P`` ranks (None: simulated,
            for ``explain`` on one process).
        name: how compiled graphs refer to the group.
    """

    size: int
    rank: int
    group: Any
    name: str

    def shard_length(self, length: int) -> int:
        """``L = ⌈T / P⌉`` (at least 2): tokens per shard."""
        return max(2, -(-length // self.size))


def shard_positions(index: Tensor, length: Any, chunk: int | None, size: int, rank: Any) -> Tensor:
    """The global positions of a shard's local positions ``index`` (0-based, any shape).

    ``length``: ``L``, the shard's tokens; ``chunk``: ``Q`` of the chunk-interleaved layout
    (None: contiguous, ``r·L + i``). Interleaved, local ``i`` in chunk ``c = ⌊i/Q⌋`` is global
    ``c·P·Q + r·n_c + (i − c·Q)``, ``n_c = min(Q, L − c·Q)``. Plain tensor arithmetic, so a
    graph that calls it stays dynamic in ``L``.
    """
    if chunk is None:
        return index + rank * length
    c = torch.div(index, chunk, rounding_mode="floor")
    n = (c * -chunk + length).clamp(max=chunk)  # tensor first: a SymInt length stays symbolic
    return index + c * ((size - 1) * chunk) + rank * n


def _gathered_positions(x: Tensor, dim: int, chunk: int, size: int) -> Tensor:
    """The global position of each index along ``dim`` of an all-to-all's gathered tensor
    (the ``P`` shards' ``L`` tokens each, in rank order)."""
    L = x.shape[dim] // size
    i = torch.arange(L, device=x.device)
    return torch.cat([shard_positions(i, L, chunk, size, r) for r in range(size)])


def interleaved_to_sequence(x: Tensor, dim: int, chunk: int, size: int) -> Tensor:
    """The gathered ``P`` interleaved shards along ``dim``, put in sequence order."""
    return x.index_select(dim, torch.argsort(_gathered_positions(x, dim, chunk, size)))


def sequence_to_interleaved(x: Tensor, dim: int, chunk: int, size: int) -> Tensor:
    """The inverse of :func:`interleaved_to_sequence`."""
    return x.index_select(dim, _gathered_positions(x, dim, chunk, size))


_GROUPS: dict[str, SequenceGroup] = {}
_ACTIVE: contextvars.ContextVar[SequenceGroup | None] = contextvars.ContextVar("longctx_sequence_group", default=None)


def sequence_group(sequence_parallel: int, process_group: Any = None) -> SequenceGroup:
    """This rank's group of ``sequence_parallel`` consecutive ranks of ``process_group``.

    Every rank must call it (the first call creates the groups, collectively). Raises
    :class:`SequenceParallelError` when no process group is initialised or its size is not a
    multiple of ``P``.
    """
    import torch.distributed as dist

    P = sequence_parallel
    if not (dist.is_available() and dist.is_initialized()):
        raise SequenceParallelError(
            f"distributed={{'sequence_parallel': {P}}} needs an initialised torch.distributed process group: launch "
            f"with `torchrun --nproc-per-node {P} ...` and call torch.distributed.init_process_group() before the first step")
    pg = process_group if process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if world % P:
        raise SequenceParallelError(
            f"sequence_parallel={P} splits the ranks into groups of {P}, but the process group has {world} ranks "
            f"(not a multiple of {P})")
    ranks = dist.get_process_group_ranks(pg)
    name = f"seq{P}:" + ",".join(map(str, ranks[rank // P * P:(rank // P + 1) * P]))
    if name in _GROUPS:
        return _GROUPS[name]
    mine = pg
    if world > P:
        # new_group is collective over the whole group: every rank creates every subgroup.
        for i in range(world // P):
            g = dist.new_group(ranks[i * P:(i + 1) * P])
            if i == rank // P:
                mine = g
    _GROUPS[name] = SequenceGroup(P, rank % P, mine, name)
    return _GROUPS[name]


def simulated_group(sequence_parallel: int) -> SequenceGroup:
    """A group with no processes behind it, as rank 0 of ``P``: for ``explain`` (the passes
    plan the collectives; nothing runs)."""
    name = f"seq{sequence_parallel}:simulated"
    return _GROUPS.setdefault(name, SequenceGroup(sequence_parallel, 0, None, name))


def get_group(name: str) -> SequenceGroup:
    try:
        return _GROUPS[name]
    except KeyError:
        raise RuntimeError(f"sequence parallelism: no group {name!r} in this process") from None


@contextlib.contextmanager
def active_group(group: SequenceGroup | None) -> Iterator[None]:
    """The group the graphs compiled inside this context are sharded over."""
    token = _ACTIVE.set(group)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def current_group() -> SequenceGroup | None:
    return _ACTIVE.get()


def _process_group(name: str) -> Any:
    g = get_group(name)
    if g.group is None:
        raise RuntimeError(f"sequence parallelism: group {name!r} is simulated (explain only); it cannot communicate")
    return g.group


# ------------------------------------------------------------------------------ collectives
#: Bytes this process sent to other ranks since :func:`reset_communication`, per collective:
#: ``all_to_all`` (attention), ``states`` (scan states, all-gather), ``halos`` (convolution
#: windows, all-gather), ``all_reduce`` (the loss; scan-state gradients) and ``gradients``
#: (parameter gradients; all-reduce payloads).
_SENT = {"all_to_all": 0, "states": 0, "halos": 0, "all_reduce": 0, "gradients": 0}


def communication() -> dict[str, int]:
    """Bytes sent per collective since the last :func:`reset_communication`."""
    return dict(_SENT)


def reset_communication() -> None:
    for k in _SENT:
        _SENT[k] = 0


def _all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, name: str) -> Tensor:
    import torch.distributed as dist

    g = get_group(name)
    P = g.size
    send = torch.stack([p.contiguous() for p in x.chunk(P, dim=scatter_dim)])  # [P, ...]: block j goes to rank j
    if g.group is None:
        # A simulated group (explain): only the shapes are planned; no data moves.
        return torch.cat([send[0]] * P, dim=gather_dim)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=g.group)
    _SENT["all_to_all"] += send[0].numel() * send.element_size() * (P - 1)  # the own block stays
    return torch.cat(recv.unbind(0), dim=gather_dim)  # block j came from rank j: shard j, in order


@torch.library.custom_op("longctx::seq_all_to_all", mutates_args=())
def seq_all_to_all(x: Tensor, scatter_dim: int, gather_dim: int, group: str) -> Tensor:
    """Split ``x`` into ``P`` blocks along ``scatter_dim``, send block ``j`` to rank ``j``, and
    join what arrives along ``gather_dim`` in rank order."""
    return _all_to_all(x, scatter_dim, gather_dim, group)


@seq_all_to_all.register_fake
def _(x, scatter_dim, gather_dim, group):
    P = get_group(group).size
    shape = list(x.shape)
    shape[scatter_dim] = shape[scatter_dim] // P
    shape[gather_dim] = shape[gather_dim] * P
    return x.new_empty(shape)


def _a2a_setup(ctx, inputs, output):
    _, ctx.scatter_dim, ctx.gather_dim, ctx.group = inputs


def _a2a_backward(ctx, grad):
    # The inverse exchange: what was gathered along gather_dim is scattered back.
    return torch.ops.longctx.seq_all_to_all(grad, ctx.gather_dim, ctx.scatter_dim, ctx.group), None, None, None


seq_all_to_all.register_autograd(_a2a_backward, setup_context=_a2a_setup)


@torch.library.custom_op("longctx::seq_all_reduce", mutates_args=())
def seq_all_reduce(x: Tensor, group: str) -> Tensor:
    """The sum of ``x`` over the group's ranks."""
    import torch.distributed as dist

    y = x.clone()
    if get_group(group).group is not None:  # simulated (explain): this rank's part only
        dist.all_reduce(y, group=_process_group(group))
        _SENT["all_reduce"] += y.numel() * y.element_size()
    return y


@seq_all_reduce.register_fake
def _(x, group):
    return torch.empty_like(x)


def _ar_setup(ctx, inputs, output):
    pass


def _ar_backward(ctx, grad):
    # Every rank's part enters the sum once: d(sum)/d(part) = 1.
    return grad, None


seq_all_reduce.register_autograd(_ar_backward, setup_context=_ar_setup)


@torch.library.custom_op("longctx::seq_all_gather", mutates_args=())
def seq_all_gather(x: Tensor, group: str) -> Tensor:
    """``[P, *x.shape]``: every rank's ``x``, in rank order."""
    return torch.stack(_all_gather(x, get_group(group), "states"))


@seq_all_gather.register_fake
def _(x, group):
    return x.new_empty((get_group(group).size, *x.shape))


def _ag_setup(ctx, inputs, output):
    ctx.group = inputs[1]


def _ag_backward(ctx, grad):
    # Every rank's slot j was read by some ranks: rank j's gradient is the sum over ranks of
    # their gradient for slot j.
    g = get_group(ctx.group)
    return torch.ops.longctx.seq_all_reduce(grad.contiguous(), ctx.group)[g.rank], None


seq_all_gather.register_autograd(_ag_backward, setup_context=_ag_setup)


def _all_gather(x: Tensor, g: SequenceGroup, counter: str) -> list[Tensor]:
    """Every rank's ``x``, in rank order; the bytes sent are counted under ``counter``."""
    import torch.distributed as dist

    if g.group is None:  # simulated (explain): shapes only
        return [x] * g.size
    out = [torch.empty_like(x) for _ in range(g.size)]
    dist.all_gather(out, x.contiguous(), group=g.group)
    _SENT[counter] += x.numel() * x.element_size() * (g.size - 1)
    return out


@torch.library.custom_op("longctx::seq_halo", mutates_args=())
def seq_halo(x: Tensor, dim: int, width: int, group: str) -> Tensor:
    """The ``width`` tokens of the whole sequence just before this rank's shard ``x`` (along
    ``dim``), zeros before the sequence's start: what a left padding of ``width`` zeros
    stands for on the whole sequence (a causal convolution's window)."""
    g = get_group(group)
    L = x.shape[dim]
    q = min(width, L)
    # Each rank's last q tokens (its whole shard when it is shorter than the halo).
    tails = _all_gather(x.narrow(dim, L - q, q), g, "halos")
    pieces, need, j = [], width, g.rank - 1
    while need > 0 and j >= 0:
        take = min(need, q)
        pieces.insert(0, tails[j].narrow(dim, q - take, take))
        need, j = need - take, j - 1
    if need > 0:
        shape = list(x.shape)
        shape[dim] = need
        pieces.insert(0, x.new_zeros(shape))
    return torch.cat(pieces, dim=dim)


@seq_halo.register_fake
def _(x, dim, width, group):
    shape = list(x.shape)
    shape[dim] = width
    return x.new_empty(shape)


@torch.library.custom_op("longctx::seq_halo_backward", mutates_args=())
def seq_halo_backward(grad: Tensor, dim: int, length: int, group: str) -> Tensor:
    """The gradient of ``seq_halo`` for this rank's shard (``length`` tokens along ``dim``):
    the sum of the later ranks' halo gradients that fall on its tokens."""
    g = get_group(group)
    width = grad.shape[dim]
    grads = _all_gather(grad, g, "halos")
    shape = list(grad.shape)
    shape[dim] = length
    dx = grad.new_zeros(shape)
    mine = g.rank * length
    for r in range(g.rank + 1, g.size):
        start = r * length - width  # global position of rank r's halo index 0
        lo, hi = max(start, mine), min(r * length, mine + length)
        if lo < hi:
            dx.narrow(dim, lo - mine, hi - lo).add_(grads[r].narrow(dim, lo - start, hi - lo))
    return dx


@seq_halo_backward.register_fake
def _(grad, dim, length, group):
    shape = list(grad.shape)
    shape[dim] = length
    return grad.new_empty(shape)


def _halo_setup(ctx, inputs, output):
    x, ctx.dim, _, ctx.group = inputs
    ctx.length = x.shape[ctx.dim]


def _halo_backward(ctx, grad):
    return torch.ops.longctx.seq_halo_backward(grad.contiguous(), ctx.dim, ctx.length, ctx.group), None, None, None


seq_halo.register_autograd(_halo_backward, setup_context=_halo_setup)


def _reduce_gradient(grad: Tensor, name: str) -> Tensor:
    import torch.distributed as dist

    grad = grad.clone()
    dist.all_reduce(grad, group=_process_group(name))
    _SENT["gradients"] += grad.numel() * grad.element_size()
    return grad


def reduce_gradients_over(module: torch.nn.Module, group: SequenceGroup) -> list[Any]:
    """Sum each trainable parameter's gradient over ``group`` as autograd computes it (before
    it is accumulated into ``.grad``). Returns the hook handles."""
    hook = functools.partial(_reduce_gradient, name=group.name)
    return [p.register_hook(hook) for p in module.parameters() if p.requires_grad]


def all_to_all_elements(batch: int, heads: int, kv_heads: int, head_dim: int, length: int, P: int) -> int:
    """Elements one rank sends per attention layer in a forward (the backward sends as many):
    q, k, v (k and v with ``max(kv_heads, P)`` heads after replication) and the output, each
    ``(P−1)/P`` of the rank's ``L``-token shard."""
    L = max(2, -(-length // P))
    kv = max(kv_heads, P)
    return batch * L * head_dim * (2 * heads + 2 * kv) * (P - 1) // P


def scan_exchange_elements(batch: int, inner: int, state: int, halo: int, P: int) -> int:
    """Elements one rank sends per scan layer and step to the others (all-gathers): its
    decay and final state (``2·B·D·N``) in the forward, and its convolution's last ``halo``
    tokens (``B·D·halo``) in the forward and their gradient in the backward. (The gradient of
    the gathered states is an all-reduce, counted with the loss's.)"""
    return (2 * batch * inner * state + 2 * batch * inner * halo) * (P - 1)


# ---------------------------------------------------------------------------- the inputs
def _fingerprint(t: Tensor) -> Tensor:
    """Three float64 numbers that differ, for all practical purposes, between two different
    tensors of the same shape: the sum, a position-weighted sum and the sum of squares."""
    x = t.detach().reshape(-1).to(torch.float64)
    w = torch.arange(1, x.numel() + 1, dtype=torch.float64, device=x.device).remainder_(1009)
    return torch.stack([x.sum(), (x * w).sum(), (x * x).sum()]).cpu()


def _check_same_batch(named: Mapping[str, Tensor], group: SequenceGroup) -> None:
    import torch.distributed as dist

    if group.group is None:
        return
    mine = torch.cat([torch.tensor([float(n) for n in t.shape], dtype=torch.float64) for t in named.values()]
                     + [_fingerprint(t) for t in named.values()])
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(group.size)]
    dist.all_gather(sizes, torch.tensor([mine.numel()]), group=group.group)
    if len({int(s) for s in sizes}) != 1:
        raise SequenceParallelError("the ranks of a sequence-parallel group were called with different inputs (different tensors or shapes); every rank must get the same full batch")
    everyone = [torch.empty_like(mine) for _ in range(group.size)]
    dist.all_gather(everyone, mine, group=group.group)
    if any(not torch.equal(e, everyone[0]) for e in everyone):
        raise SequenceParallelError(
            f"the ranks of a sequence-parallel group were called with different batches (inputs {sorted(named)}); "
            "every rank must get the same full batch: it keeps its own shard of the sequence")


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _bind(forward: Any, args: tuple, kwargs: dict) -> dict[str, Any] | None:
    """The call's arguments by name (``**kwargs`` flattened), or None when they cannot all be
    passed by name (positional-only or ``*args`` parameters)."""
    try:
        sig = inspect.signature(forward)
        bound = sig.bind_partial(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.POSITIONAL_ONLY):
            return None
        else:
            named[name] = value
    return named


def shard_inputs(group: SequenceGroup, forward: Any, args: tuple, kwargs: dict, sequence_dim: int | None,
                 layout_chunk: int | None = None) -> tuple[tuple, dict]:
    """This rank's call: every sequence input padded to ``P·L`` tokens and cut to the rank's
    shard (contiguous, or chunk-interleaved with chunk ``layout_chunk``); ``labels`` as
    transformers' ``shift_labels`` with the global ``num_items_in_batch``; an all-ones
    ``attention_mask`` dropped.

    A sequence input is a tensor with a dim ``sequence_dim`` of the first such tensor's
    length ``T``. Raises :class:`SequenceParallelError` for what cannot be sharded exactly
    (a padding mask, labels for a model that does not take ``shift_labels``) and when the
    ranks were given different batches.
    """
    if sequence_dim is None:
        raise SequenceParallelError("sequence parallelism needs Config.sequence_dim (the dim of the inputs to shard)")
    d = sequence_dim
    named = _bind(forward, args, kwargs)
    by_name = named is not None
    if not by_name:
        named = {**{i: a for i, a in enumerate(args)}, **kwargs}
    lengths = [v.shape[d] for v in named.values() if isinstance(v, Tensor) and v.dim() > d]
    if not lengths:
        raise SequenceParallelError(f"no tensor input has a sequence dim {d} (Config.sequence_dim) to shard")
    T = lengths[0]
    seq = {k: v for k, v in named.items() if isinstance(v, Tensor) and v.dim() > d and v.shape[d] == T}
    _check_same_batch({str(k): v for k, v in seq.items()}, group)

    mask = named.get("attention_mask")
    if isinstance(mask, Tensor):
        if not bool((mask != 0).all()):
            raise SequenceParallelError("sequence parallelism does not take a padding mask yet (attention_mask has zeros): pack or trim the batch")
        named["attention_mask"] = None
        seq.pop("attention_mask", None)
    labels = named.get("labels")
    if isinstance(labels, Tensor) and labels.dim() > d and labels.shape[d] == T:
        if not (by_name and _accepts(forward, "shift_labels")):
            raise SequenceParallelError(
                "sequence parallelism shards `labels` as transformers' `shift_labels` (the shift taken on the whole "
                "sequence); this model's forward does not take shift_labels")
        shifted = named.get("shift_labels")
        if not isinstance(shifted, Tensor):
            shifted = F.pad(labels.narrow(d, 1, T - 1), [0, 0] * (labels.dim() - d - 1) + [0, 1], value=IGNORE_INDEX)
        if named.get("num_items_in_batch") is None:
            # The global count: each shard's summed loss divided by it is its part of the mean.
            named["num_items_in_batch"] = (shifted != IGNORE_INDEX).sum()
        seq["labels"] = seq["shift_labels"] = shifted

    L = group.shard_length(T)
    for k, v in seq.items():
        pad = [0, 0] * (v.dim() - d - 1) + [0, group.size * L - T]
        fill = IGNORE_INDEX if k in ("labels", "shift_labels") else 0
        v = F.pad(v, pad, value=fill)
        if layout_chunk is None:
            named[k] = v.narrow(d, group.rank * L, L).contiguous()
        else:
            index = shard_positions(torch.arange(L, device=v.device), L, layout_chunk, group.size, group.rank)
            named[k] = v.index_select(d, index)
    if by_name:
        return (), named
    return tuple(named[i] for i in range(len(args))), {k: v for k, v in named.items() if not isinstance(k, int)}


def global_loss(out: Any, group: SequenceGroup) -> Any:
    """``out`` with its loss (``out.loss``, ``out["loss"]`` or a scalar ``out``) summed over
    the group: each rank computed its shard's part of it."""
    def reduce(x: Any) -> Any:
        return torch.ops.longctx.seq_all_reduce(x, group.name) if isinstance(x, Tensor) else x

    if isinstance(out, Tensor):
        if out.dim() != 0:
            raise SequenceParallelError("under sequence parallelism the model must return its loss (a scalar, or an output with .loss): per-token outputs hold one shard only")
        return reduce(out)
    if isinstance(out, Mapping) and "loss" in out:
        out["loss"] = reduce(out["loss"])
        return out
    if getattr(out, "loss", None) is not None:
        out.loss = reduce(out.loss)
        return out
    return out
