"""``torch.library`` registration of the tiled LM head + cross-entropy, and the public function.

Ops (all ``mutates_args=()``; ``h [N, H]``, ``weight [V, H]``, ``bias [V]``, ``labels [N]``):

* ``longctx::linear_cross_entropy_fwd(h, weight, bias?, labels, logits?, ignore_index,
  reduction, chunk_size) -> (loss, lse)``: ``loss`` a scalar and ``lse [N]``, both in the
  accumulation dtype (float32; float64 for float64 inputs). ``logits [N, V]``, when given,
  are the already-computed ``F.linear(h, weight, bias)`` (a model that also returns its
  logits has them anyway): the forward reads them instead of multiplying again. They get no
  gradient (pass them detached).
* ``longctx::linear_cross_entropy_bwd(dloss?, dlse?, h, weight, bias?, labels, lse,
  ignore_index, reduction, chunk_size) -> (dh, dweight, dbias)``: ``dbias`` is ``[V]``, or
  an empty ``[0]`` tensor when there is no bias (a schema cannot return an optional tensor).

``register_autograd`` saves ``h, weight, bias, labels, lse`` — never the logits, even when
they were an input — so AOTAutograd keeps nothing ``[N, V]`` for backward: the backward
recomputes each tile's logits from ``h`` and ``weight``. Fake implementations use shape
arithmetic only, so one compiled graph serves every number of tokens.

No Triton kernel: per tile the work is two large matmuls (cuBLAS's best case) around a
row-wise log-sum-exp; the torch implementation runs on every device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from longctx_compiler.runtime.autocast import AUTOCAST_DEVICE_TYPES, register_autocast

from .chunked import AUTO, linear_cross_entropy_backward, linear_cross_entropy_forward
from .reference import accumulation_dtype, check_transform, validate_arguments

__all__ = ["linear_cross_entropy"]


@torch.library.custom_op("longctx::linear_cross_entropy_fwd", mutates_args=())
def linear_cross_entropy_fwd(
    h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, logits: Optional[Tensor],
    ignore_index: int, reduction: str, chunk_size: int, logit_scale: float = 1.0, softcap: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """``(loss [], lse [N])`` of ``cross_entropy(transform(linear(h, weight, bias)), labels)``, tile
    by tile (``transform``: ``reference.transform_logits``, the identity by default)."""
    return linear_cross_entropy_forward(h, weight, bias, labels, logits, ignore_index, reduction, chunk_size, logit_scale, softcap)


@linear_cross_entropy_fwd.register_fake
def _(h, weight, bias, labels, logits, ignore_index, reduction, chunk_size, logit_scale=1.0, softcap=0.0):
    acc = accumulation_dtype(h.dtype)
    return h.new_empty((), dtype=acc), h.new_empty((h.shape[0],), dtype=acc)


@torch.library.custom_op("longctx::linear_cross_entropy_bwd", mutates_args=())
def linear_cross_entropy_bwd(
    dloss: Optional[Tensor], dlse: Optional[Tensor], h: Tensor, weight: Tensor, bias: Optional[Tensor],
    labels: Tensor, lse: Tensor, ignore_index: int, reduction: str, chunk_size: int, logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh [N, H], dweight [V, H], dbias [V] or [0])``; logits recomputed tile by tile."""
    dh, dw, db = linear_cross_entropy_backward(dloss, dlse, h, weight, bias, labels, lse, ignore_index, reduction, chunk_size,
                                               logit_scale, softcap)
    return dh, dw, (db if db is not None else h.new_empty((0,)))


@linear_cross_entropy_bwd.register_fake
def _(dloss, dlse, h, weight, bias, labels, lse, ignore_index, reduction, chunk_size, logit_scale=1.0, softcap=0.0):
    db = bias.new_empty(bias.shape) if bias is not None else h.new_empty((0,))
    return h.new_empty(h.shape), weight.new_empty(weight.shape), db


def _setup(ctx, inputs, output):
    h, weight, bias, labels, _logits, *args = inputs
    _, lse = output
    # The logits input is deliberately not saved: backward recomputes tile logits.
    ctx.save_for_backward(h, weight, bias, labels, lse)
    ctx.args = tuple(args)  # ignore_index, reduction, chunk_size[, logit_scale, softcap]


def _backward(ctx, dloss, dlse):
    h, weight, bias, labels, lse = ctx.saved_tensors
    dh, dw, db = linear_cross_entropy_bwd(dloss, dlse, h, weight, bias, labels, lse, *ctx.args)
    return (dh, dw, (db if bias is not None else None)) + (None,) * (2 + len(ctx.args))


linear_cross_entropy_fwd.register_autograd(_backward, setup_context=_setup)


# -- autocast ----------------------------------------------------------------------------------
# Under ``torch.autocast`` the op takes the dtypes the original ops would: ``linear`` is on
# autocast's lower-precision list (its floating operands are cast to the autocast dtype, the
# logits come out in it) and ``cross_entropy`` on its float32 list — which is what the op does
# with 16-bit inputs anyway (tile logits upcast to float32, float32 accumulation). So the forward's
# autocast kernel casts ``h``, ``weight`` and ``bias`` as autocast casts a ``linear``'s operands
# (floating point, on the autocast device, not float64: autocast's eligibility rule) and runs
# the op with autocast off; the backward op only runs with autocast off. Inside the op nothing
# is autocast again: its numerics depend on its input dtypes alone, whatever the ambient state.
_lib = torch.library.Library("longctx", "FRAGMENT")  # noqa: TOR901 - kept alive with the module
# fwd: h, weight, bias are the linear's operands (positions 0-2); labels and the given logits
# (already the linear's output, in the autocast dtype) are left alone.
register_autocast(_lib, "linear_cross_entropy_fwd", torch.ops.longctx.linear_cross_entropy_fwd.default, cast=(0, 1, 2))
register_autocast(_lib, "linear_cross_entropy_bwd", torch.ops.longctx.linear_cross_entropy_bwd.default)


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Tensor | None = None,
    *,
    logits: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    logit_scale: float = 1.0,
    softcap: float = 0.0,
) -> Tensor:
    """``F.cross_entropy(F.linear(h, weight, bias).float(), labels)`` without ``[N, V]`` saved.

    Args:
        h: ``[N, H]`` hidden states (fp16, bf16, fp32 or fp64), one row per token.
        weight: ``[V, H]`` the head, same dtype as ``h``; bias: ``[V]`` or None. Under
            ``torch.autocast`` they may differ: they are cast as autocast casts a ``linear``'s
            operands, and the logits are computed in the autocast dtype.
        labels: ``[N]`` int64; tokens whose label is ``ignore_index`` contribute nothing.
        logits: optional ``[N, V]`` already-computed ``F.linear(h, weight, bias)`` (e.g. a
            model that also returns them): used for the forward value only (detached here),
            gradients still flow to ``h``/``weight``/``bias`` through recomputed tiles.
        ignore_index: see ``labels``.
        reduction: ``"mean"`` over the non-ignored tokens (NaN if there are none, with zero
            gradients, as ``F.cross_entropy``) or ``"sum"``.
        chunk_size: tokens per tile; the largest temporaries are ``[chunk_size, V]``. None
            (default): tiles whose logits are no larger than ``h`` (``⌈N·H / V⌉`` rows).
        logit_scale, softcap: the head's transform of its logits before the loss, in float32
            (float64 for float64 inputs): ``z · logit_scale`` (Cohere; Granite's division by
            ``logits_scaling`` is ``logit_scale = 1 / logits_scaling``), then with ``softcap >
            0`` ``softcap · tanh(z / softcap)`` (Gemma's final soft-capping).
    Returns:
        the scalar loss in float32 (float64 for float64 inputs). Differentiable in ``h``,
        ``weight`` and ``bias``.

    Under ``torch.autocast`` this is ``cross_entropy(linear(h, weight, bias), labels)`` as
    autocast runs it: the linear in the autocast dtype, the loss in float32.
    """
    validate_arguments(h, weight, bias, labels, logits, ignore_index, reduction, chunk_size, "linear_cross_entropy",
                       autocast=torch.is_autocast_enabled(h.device.type) and h.device.type in AUTOCAST_DEVICE_TYPES)
    check_transform(logit_scale, softcap, "linear_cross_entropy")
    if logits is not None:
        logits = logits.detach()
    return linear_cross_entropy_fwd(h, weight, bias, labels, logits, ignore_index, reduction, AUTO if chunk_size is None else chunk_size,
                                    float(logit_scale), float(softcap))[0]
