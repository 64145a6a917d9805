"""Autocast for our ops: one rule, one kernel registration, one way to replay a recorded state.

Under ``torch.autocast`` every op of ours takes the dtypes the ops it replaced would take, and
nothing *inside* it is recast by the ambient state: its numerics depend on its input dtypes
(and, for a captured body, on the autocast state it was traced in) alone.

* :func:`register_autocast` gives an op an Autocast kernel per device type: it casts the
  chosen floating arguments as autocast casts the operands of a lower-precision op (``linear``,
  SDPA: :func:`autocast_eligible`), reading the region's dtype when it runs (bf16 and fp16
  regions both work), then calls the op again below the Autocast key. Autograd records the
  casts, so gradients flow back to the uncast inputs in their own dtypes. With nothing to
  cast the kernel only turns autocast off for the op (a scan takes its inputs as they come).
* :func:`current_autocast` records the state a graph is traced in; :func:`autocast_as` runs
  code in exactly that state, whatever the caller's: a block's captured body, run again inside
  its op chunk by chunk, means what it meant when it was traced.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
from torch import Tensor

__all__ = ["AUTOCAST_DEVICE_TYPES", "autocast_eligible", "autocast_cast", "register_autocast", "current_autocast", "autocast_as"]

#: The device types autocast exists for in this build.
AUTOCAST_DEVICE_TYPES: tuple[str, ...] = tuple(d for d in ("cpu", "cuda", "xpu", "mps") if torch.amp.is_autocast_available(d))


def autocast_eligible(t: object, device_type: str) -> bool:
    """Whether autocast casts ``t`` for a lower-precision op (torch.amp's rule: a floating
    tensor on the autocast device type, not float64)."""
    return isinstance(t, Tensor) and t.is_floating_point() and t.device.type == device_type and t.dtype != torch.float64


def autocast_cast(args: tuple, device_type: str, positions: frozenset[int] | None = None) -> tuple:
    """``args`` as autocast casts a lower-precision op's operands, if autocast is on for
    ``device_type`` (the region's dtype; ``positions`` limits it to those arguments, None: all)."""
    if not torch.is_autocast_enabled(device_type):
        return args
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        a.to(dtype) if (positions is None or i in positions) and autocast_eligible(a, device_type) else a
        for i, a in enumerate(args)
    )


def _autocast_key(device_type: str) -> str:
    return "Autocast" + torch._C._dispatch_key_for_device(device_type)


def register_autocast(lib: torch.library.Library, name: str, overload: Any, cast: Iterable[int] | str = ()) -> None:
    """Register ``overload``'s Autocast kernel (every device type autocast exists for) in ``lib``.

    Args:
        name: the op's name in ``lib``'s namespace (``"chunked_attention_fwd"``).
        overload: the op (``torch.ops.longctx.<name>.default``).
        cast: positions of the arguments autocast would cast (a ``linear``'s ``h``, ``W``,
            ``b``), ``"all"`` for every tensor argument (SDPA's rule), or nothing: the op takes
            its inputs as they come and runs with autocast off.
    """
    positions = None if cast == "all" else frozenset(cast)
    for device_type in AUTOCAST_DEVICE_TYPES:
        key = _autocast_key(device_type)
        below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(_keyset, *args, _device_type=device_type, _below=below, **kwargs):
            if positions is None or positions:
                args = autocast_cast(args, _device_type, positions)
            with torch._C._ExcludeDispatchKeyGuard(_below):
                return overload(*args, **kwargs)

        lib.impl(name, kernel, key, with_keyset=True)


def current_autocast() -> tuple[tuple[str, torch.dtype], ...]:
    """The autocast state now: ``(device_type, dtype)`` for each device type it is on for."""
    return tuple((d, torch.get_autocast_dtype(d)) for d in AUTOCAST_DEVICE_TYPES if torch.is_autocast_enabled(d))


@contextlib.contextmanager
def autocast_as(state: tuple[tuple[str, torch.dtype], ...]):
    """Run in exactly ``state`` (from :func:`current_autocast`): on with its dtype for the
    device types it names, off for every other. No weight-cast cache: a cast is made where it
    is used, the same in every run."""
    on = dict(state)
    with contextlib.ExitStack() as stack:
        for d in AUTOCAST_DEVICE_TYPES:
            if d in on:
                stack.enter_context(torch.autocast(d, dtype=on[d], enabled=True, cache_enabled=False))
            elif torch.is_autocast_enabled(d):
                stack.enter_context(torch.autocast(d, enabled=False))
        yield
