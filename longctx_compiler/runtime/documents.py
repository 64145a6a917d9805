"""Packed documents as an explicit option: ``optimize(model, packed_documents=True)``.

Packed training data puts several documents in one row. Whether a model keeps them apart is
the model's own math: transformers' attention does (with ``use_cache=False`` it numbers the
documents from ``position_ids`` that restart), its Mamba models do not (they swallow
``position_ids`` in ``**kwargs``: the convolution and the scan run across every boundary).
By default we keep what the model computes. With ``packed_documents=True`` every
sequence-mixing operation keeps the documents apart, so the result equals running each
document alone:

* attention: a query sees only keys of its own document (the op's ``segment_ids``);
* selective and SSD scans: the state resets where a document starts (``seq_idx``, mamba_ssm's
  semantics);
* causal depthwise convolutions: a tap that would read the previous document reads zero, as
  the convolution's own zero padding does at the start of a document run alone.

Anything else that mixes tokens and is not made document-aware makes the compile raise
(:class:`PackedDocumentsError`): never a silent mix.

**Where the documents come from** (the wrapper's keyword arguments, per call):

* ``seq_idx`` ``[B, T]`` int: the document index of each token (mamba_ssm's convention; a new
  document wherever it changes), popped before the model is called;
* ``cu_seqlens`` ``[n + 1]`` int: cumulative document lengths over the ``B·T`` tokens in
  row-major order, ``0 = cu[0] <= ... <= cu[n] = B·T`` (flash-attn's varlen convention; a row
  boundary always starts a document), popped before the model is called;
* ``position_ids`` ``[B, T]`` or ``[1, T]``: a new document wherever the position does not
  step by one (transformers' packed convention), passed on to the model as well.

Boundaries from all that are given are joined. Without any, each row is one document.

**How they reach the graph.** The compiled callable becomes
``(ids, *args, **kwargs) -> (model(*args, **kwargs), longctx.document_ids(ids))``: the ids are
a graph input and the marker op ``longctx::document_ids`` (a copy, returned so that Dynamo
keeps it) names them; the passes read the marker's output (:func:`documents_node`). The ids
handed in are normalised per row to ``0, 1, 2, ...`` (non-decreasing), which the attention
op's pair skipping exploits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import Tensor

__all__ = ["PackedDocumentsError", "DOCUMENT_KEYWORDS", "document_ids_of", "with_documents", "documents_node", "joint_documents",
           "DOCUMENTS_OP"]

#: Keyword arguments the option takes from a call and does not pass to the model.
DOCUMENT_KEYWORDS = ("seq_idx", "cu_seqlens")
#: Multiplier of :func:`joint_documents`: larger than any per-row document number (< T).
_JOINT_BASE = 1 << 31


class PackedDocumentsError(ValueError):
    """Packed documents cannot be kept apart exactly (bad document input, or an operation
    that mixes tokens and has no document-aware form)."""


@torch.library.custom_op("longctx::document_ids", mutates_args=())
def _document_ids(ids: Tensor) -> Tensor:
    """The packed documents' ids ``[B, T]`` (int64), as given: a marker the passes find."""
    return ids.clone()


@_document_ids.register_fake
def _(ids: Tensor) -> Tensor:
    return torch.empty_like(ids)


DOCUMENTS_OP = torch.ops.longctx.document_ids.default


def _changes(ids: Tensor) -> Tensor:
    """``[B, T]`` bool: True at ``t >= 1`` where ``ids`` changes from ``t - 1``."""
    change = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    change[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return change


def _int_tensor(name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor) or value.dtype not in (torch.int32, torch.int64):
        raise PackedDocumentsError(f"{name} must be an int32/int64 tensor, got {getattr(value, 'dtype', type(value).__name__)}")
    return value


def _rows_of(name: str, value: Tensor, batch: int, length: int) -> Tensor:
    """``value`` as ``[batch, length]`` (a ``[T]`` or ``[1, T]`` value broadcast over rows)."""
    if value.dim() == 1:
        value = value[None]
    if value.dim() != 2 or value.shape[1] != length or value.shape[0] not in (1, batch):
        raise PackedDocumentsError(f"{name} has shape {tuple(value.shape)}; expected [{batch}, {length}] (the inputs' batch and sequence length)")
    return value.expand(batch, length)


def _reference(args: tuple, kwargs: dict) -> Tensor:
    """The call's ``[B, T, ...]`` tensor: its token ids or embeddings, else its first such input."""
    for value in (kwargs.get("input_ids"), kwargs.get("inputs_embeds"), *args, *kwargs.values()):
        if isinstance(value, Tensor) and value.dim() >= 2:
            return value
    raise PackedDocumentsError("packed_documents: the call has no [batch, sequence, ...] tensor input to take the documents' shape from")


def document_ids_of(args: tuple, kwargs: dict) -> tuple[Tensor, dict]:
    """The call's document ids ``[B, T]`` (int64, ``0, 1, ...`` per row) and its keyword
    arguments without ours (``seq_idx``, ``cu_seqlens``).

    Raises:
        PackedDocumentsError: a document input of the wrong type, shape or content.
    """
    kwargs = dict(kwargs)
    seq_idx, cu_seqlens = (kwargs.pop(k, None) for k in DOCUMENT_KEYWORDS)
    position_ids = kwargs.get("position_ids")
    reference = _reference(args, kwargs)
    batch, length, device = int(reference.shape[0]), int(reference.shape[1]), reference.device
    change = torch.zeros(batch, length, dtype=torch.bool, device=device)
    if seq_idx is not None:
        change |= _changes(_rows_of("seq_idx", _int_tensor("seq_idx", seq_idx), batch, length).to(device))
    if cu_seqlens is not None:
        cu = _int_tensor("cu_seqlens", cu_seqlens).to(device)
        if cu.dim() != 1 or cu.numel() < 2:
            raise PackedDocumentsError(f"cu_seqlens must be 1-D [documents + 1], got shape {tuple(cu.shape)}")
        total = batch * length
        if int(cu[0]) != 0 or int(cu[-1]) != total or bool((cu[1:] < cu[:-1]).any()):
            raise PackedDocumentsError(
                f"cu_seqlens must rise from 0 to the {total} tokens of the batch ({batch} rows of {length}), got {cu.tolist()}")
        starts = torch.zeros(total + 1, dtype=torch.bool, device=device)
        starts[cu] = True
        change |= starts[:total].view(batch, length)
    if position_ids is not None:
        pos = _rows_of("position_ids", _int_tensor("position_ids", position_ids), batch, length).to(device)
        step = torch.zeros(batch, length, dtype=torch.bool, device=device)
        step[:, 1:] = (pos[:, 1:] - pos[:, :-1]) != 1
        change |= step
    change[:, 0] = False
    return change.to(torch.int64).cumsum(1), kwargs


def with_documents(fn: Any):
    """``fn`` as the compiled callable of the option: the ids first, the marker returned.
    (The closure's name is ``fn``, a root the report's module paths start inside.)"""

    def longctx_call_with_documents(document_ids: Tensor, *args: Any, **kwargs: Any) -> tuple[Any, Tensor]:
        # The ids' sizes are the inputs' batch and sequence length (document_ids_of built them
        # so): said here, the graph's shapes know it (one size symbol for T, not two).
        reference = _reference(args, kwargs)
        torch._check(document_ids.shape[0] == reference.shape[0])
        torch._check(document_ids.shape[1] == reference.shape[1])
        marked = _document_ids(document_ids)
        return fn(*args, **kwargs), marked

    return longctx_call_with_documents


def documents_node(gm: fx.GraphModule) -> fx.Node | None:
    """The marker's node (its value: the ids ``[B, T]``), or None when the graph has none."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is DOCUMENTS_OP:
            return node
    return None


def joint_documents(a: Tensor, b: Tensor) -> Tensor:
    """Ids that differ wherever ``a`` or ``b`` differ: ``a·2³¹ + b``, for ``b`` in ``[0, 2³¹)``.

    For ``a`` and ``b`` non-decreasing along the row (document numberings), the result is
    too, so the attention op still skips chunk pairs of different documents.
    """
    return a.to(torch.int64) * _JOINT_BASE + b.to(torch.int64)
