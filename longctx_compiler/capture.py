"""Capture-time recognition of known selective-scan functions.

Libraries spell the Mamba scan as a *function* (``transformers``' ``mamba_selective_scan``,
``mamba_ssm``'s ``selective_scan_fn``/``selective_scan_ref``). Traced by Dynamo, their torch
paths become a Python loop unrolled over T (the recurrent path) or an unrolled log-depth
tree of vmapped combines (``associative_scan`` in "generic" mode, what ``transformers``
picks on CPU): nothing in the graph is one node, and the graph grows with T. Instead of
recognising those shapes afterwards, we recognise the *function* and substitute it while
Dynamo traces::

    with capture_context(config):
        compiled(*args, **kwargs)        # every call, not only the first

Inside the context each recognised function, looked up by its defining module's globals,
is replaced by a wrapper that

* while compiling (``torch.compiler.is_compiling()``, constant-folded by Dynamo) calls the
  canonical op ``torch.ops.longctx.selective_scan_fwd.default`` with ``chunk_size = 0``
  ("not planned yet") in exactly the original function's semantics, and
* otherwise calls the original function (eager behaviour is untouched).

**Why every call.** Dynamo guards on the identity of the globals a frame read: the mixer's
``forward`` read ``mamba_selective_scan`` from its module, so the guard checks that the
global is still our wrapper. The wrappers are created once per (module, name) and cached,
so every call inside the context sees the same objects and the guards hold: no recompile.
Outside the context the originals are restored (plain ``torch.compile`` or eager runs of
the same model in the same process see the library's own function).

**Recognition** is by signature, not identity: a module-level function of an imported
``transformers.models.*`` module (or ``mamba_ssm.ops.selective_scan_interface``) whose name
contains ``selective_scan`` (``selective_state_update``, the one-step decoder function, is
not a scan) and whose parameters start with the Mamba argument list ``(u|hidden_states,
delta|dt, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)``. That covers the
copies in Mamba, FalconMamba, Jamba and Zamba (and any future model that copies the
function). ``mamba_ssm``'s fused ``mamba_inner_fn`` (conv1d + projections + scan + out
projection in one kernel) is left alone: the canonical op covers the scan only.

**Provenance.** The wrapper emits the op inside ``torch.fx.traceback.annotate({...})`` where
available, so the op node carries ``node.meta["custom"]["longctx_source"]`` (e.g.
``"transformers mamba scan"``); on torch builds without ``annotate`` the rewrite pass reads
the wrapper's frame name in ``node.meta["stack_trace"]`` instead (:func:`source_of`).

**Dtypes.** ``transformers``' function computes partly in float32 (it casts B and u with
``.float()``), partly in the dtype of ``dt`` (the bias add and softplus), and returns a
dtype given by torch's promotion of ``hidden_states``, ``D`` and ``z``. The wrapper computes
in float64 when any input is float64 and in float32 otherwise (never less precise than the
original) and casts the output and final state to the dtypes the original returns. Where that
is more precise than the original (a float64 model: B and u rounded to float32 there; 16-bit
activations, e.g. under ``torch.autocast``: Δ, the readout's state and ``silu(z)`` in 16 bits
there) the node carries a note (:data:`PRECISION_KEY`) that the report shows as the rewrite's
``details["precision"]``.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import re
import sys
import threading
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Iterator

import torch

from longctx_compiler.config import Config

# Importing the op module registers torch.ops.longctx.selective_scan_fwd/_bwd.
from longctx_compiler.kernels.selective_scan import op as _op  # noqa: F401

__all__ = ["capture_context", "captured_functions", "source_of", "precision_of", "SOURCE_KEY", "PRECISION_KEY", "WRAPPER_NAME"]

log = logging.getLogger("longctx_compiler")

#: Key in ``node.meta["custom"]`` naming the library function a canonical node came from.
SOURCE_KEY = "longctx_source"
#: Key in ``node.meta["custom"]``: where the op computes more precisely than the library
#: function it replaces (the casts of the original it does not reproduce), for the report.
PRECISION_KEY = "longctx_precision"
#: The wrappers' ``__code__`` name: visible in ``node.meta["stack_trace"]`` of the op node.
WRAPPER_NAME = "longctx_captured_selective_scan"

_MAMBA_PARAMS = (("u", "hidden_states", "x"), ("delta", "dt"), ("A",), ("B",), ("C",), ("D",), ("z",), ("delta_bias",), ("delta_softplus",), ("return_last_state",))
_MAMBA_SSM_MODULE = "mamba_ssm.ops.selective_scan_interface"


@dataclass(frozen=True)
class _Site:
    module: str
    name: str
    original: Callable[..., Any]
    wrapper: Callable[..., Any]
    source: str


_lock = threading.RLock()
_sites: dict[tuple[str, str], _Site] = {}
_scanned: dict[str, int] = {}
_depth = 0


def _mamba_signature(fn: Callable[..., Any]) -> tuple[str, ...] | None:
    """The parameter names if ``fn`` takes the Mamba selective-scan arguments, else None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(names) < len(_MAMBA_PARAMS):
        return None
    for name, allowed in zip(names, _MAMBA_PARAMS):
        if name not in allowed:
            return None
    return tuple(names)


def _source_label(module_name: str) -> str:
    if module_name.startswith("transformers.models."):
        family = module_name.split(".")[2]
        return f"transformers {family} scan"
    return f"{module_name.split('.')[0]} scan"


def _is_candidate(module_name: str, name: str, fn: Any) -> bool:
    if not callable(fn) or "selective_scan" not in name or isinstance(fn, type):
        return False
    # Another module's function imported by name is recognised where it is defined.
    defined_in = getattr(fn, "__module__", None)
    return defined_in == module_name or getattr(getattr(fn, "__wrapped__", None), "__module__", None) == module_name


def _scan_module(module_name: str, module: ModuleType) -> None:
    for name, fn in list(vars(module).items()):
        if isinstance(fn, functools.partial) or getattr(fn, "_longctx_capture", False):
            continue
        if not _is_candidate(module_name, name, fn):
            continue
        params = _mamba_signature(fn)
        if params is None:
            continue
        source = _source_label(module_name)
        wrapper = _make_wrapper(fn, params, source, mamba_ssm=module_name.startswith("mamba_ssm"))
        _sites[(module_name, name)] = _Site(module_name, name, fn, wrapper, source)
        log.debug("capture: recognised %s.%s as a selective scan", module_name, name)


def _discover() -> list[_Site]:
    # Rescan only modules imported since the last call (a model file imported later is found
    # on the next call; the already-seen ones cost a dictionary lookup).
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name in _scanned:
            continue
        if not (module_name.startswith("transformers.models.") or module_name == _MAMBA_SSM_MODULE):
            continue
        _scanned[module_name] = id(module)
        _scan_module(module_name, module)
    return list(_sites.values())


def captured_functions() -> list[tuple[str, str, str]]:
    """``(module, function, source label)`` of every selective-scan function recognised so far."""
    with _lock:
        return [(s.module, s.name, s.source) for s in _discover()]


@contextlib.contextmanager
def capture_context(config: Config | None = None) -> Iterator[None]:
    """Substitute the recognised scan functions for the duration of the block (re-entrant).

    With ``config.ssm.enabled`` False nothing is substituted.
    """
    global _depth
    if config is not None and not config.ssm.enabled:
        yield
        return
    with _lock:
        sites = _discover()
        if _depth == 0:
            for s in sites:
                module = sys.modules.get(s.module)
                # Only replace what is still the library's function (a user's own patch wins).
                if module is not None and vars(module).get(s.name) is s.original:
                    setattr(module, s.name, s.wrapper)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                for s in sites:
                    module = sys.modules.get(s.module)
                    if module is not None and vars(module).get(s.name) is s.wrapper:
                        setattr(module, s.name, s.original)


def source_of(node: torch.fx.Node) -> str | None:
    """The library function a canonical selective-scan node was captured from, if any."""
    custom = node.meta.get("custom") or {}
    if isinstance(custom, dict) and SOURCE_KEY in custom:
        return custom[SOURCE_KEY]
    trace = node.meta.get("stack_trace") or ""
    if f"in {WRAPPER_NAME}" in trace:
        files = re.findall(r'File "([^"]+)", line \d+, in (\S+)', trace)
        callers = [f for f, fn in files if fn != WRAPPER_NAME and "longctx_compiler" not in f]
        if callers:
            m = re.search(r"models/([^/]+)/modeling_", callers[-1])
            return f"transformers {m.group(1)} scan" if m else "captured scan"
        return "captured scan"
    return None


def precision_of(node: torch.fx.Node) -> str | None:
    """The captured node's precision note (see :data:`PRECISION_KEY`), if any."""
    custom = node.meta.get("custom") or {}
    return custom.get(PRECISION_KEY) if isinstance(custom, dict) else None


def _annotate(source: str, precision: str | None = None):
    annotate = getattr(torch.fx.traceback, "annotate", None)
    if annotate is None:
        return contextlib.nullcontext()
    return annotate({SOURCE_KEY: source, **({PRECISION_KEY: precision} if precision else {})})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def _precision_note(u, delta, A, B, C, D, z, delta_bias, cdt: torch.dtype, function: str, mamba_ssm: bool) -> str | None:
    """What the original rounds that the canonical op (computing in ``cdt``) does not.

    ``transformers``' ``mamba_selective_scan``: ``delta_bias.to(dt.dtype)``, the bias add and
    softplus in Δ's dtype, ``B.float()`` and ``hidden_states.float()``, the state rounded to the
    input dtype for the readout ``matmul(state.to(u.dtype), C)``, ``silu(z)`` in z's dtype.
    ``mamba_ssm``'s scans compute in float32. (Under autocast the original's readout matmul runs
    in the autocast dtype; its inputs are the autocast dtype there already, so the note on the
    state's rounding covers it.)
    """
    lossy = []
    if mamba_ssm:
        if _bits(cdt) > _bits(torch.float32):
            lossy.append("computes the whole scan in float32")
    else:
        if delta_bias is not None and _bits(delta_bias.dtype) > _bits(delta.dtype):
            lossy.append(f"rounds the Δ bias to {_name(delta.dtype)}")
        if _bits(delta.dtype) < _bits(cdt):
            lossy.append(f"computes Δ (bias add, softplus) in {_name(delta.dtype)}")
        narrowed = [n for n, t in (("B", B), ("u", u)) if _bits(t.dtype) > _bits(torch.float32)]
        if narrowed:
            lossy.append(f"rounds {' and '.join(narrowed)} to float32 (.float())")
        state = _promote(u.dtype, A.dtype, delta.dtype, torch.float32)
        if _bits(state) < _bits(cdt):
            lossy.append(f"keeps the state in {_name(state)}")
        if _bits(u.dtype) < _bits(state):
            lossy.append(f"rounds the state to {_name(u.dtype)} for the readout C·h")
        if z is not None and _bits(z.dtype) < _bits(cdt):
            lossy.append(f"computes silu(z) in {_name(z.dtype)}")
    if not lossy:
        return None
    return f"computes in {_name(cdt)} where {function} " + ", ".join(lossy)


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _make_wrapper(original: Callable[..., Any], params: tuple[str, ...], source: str, *, mamba_ssm: bool) -> Callable[..., Any]:
    names = params[: len(_MAMBA_PARAMS)]
    defaults = (None, None, None, False, False)
    # "transformers' mamba_selective_scan": how the report names the function it replaced.
    library = (getattr(original, "__module__", None) or source).split(".")[0]
    function = f"{library}{chr(39) if library.endswith('s') else chr(39) + 's'} {getattr(original, '__name__', 'scan')}"

    def longctx_captured_selective_scan(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return original(*args, **kwargs)
        bound = dict(zip(names, args))
        extra = dict(kwargs)
        for name in names:
            if name in extra:
                bound[name] = extra.pop(name)
        # Path switches of transformers' function (same semantics on every path); anything
        # else (packed sequences: cu_seqlens/seq_idx, positional extras) goes to the original.
        extra.pop("use_mambapy", None)
        extra.pop("use_associative_scan", None)
        if len(args) > len(names) or any(v is not None for v in extra.values()) or len(bound) < 5:
            return original(*args, **kwargs)
        u, delta, A, B, C = (bound[n] for n in names[:5])
        D, z, delta_bias, delta_softplus, return_last_state = (bound.get(n, dflt) for n, dflt in zip(names[5:], defaults))
        if not _supported(u, delta, A, B, C, D, z, delta_bias, mamba_ssm):
            return original(*args, **kwargs)
        return _canonical(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state), source, mamba_ssm, function)

    longctx_captured_selective_scan.__name__ = WRAPPER_NAME
    longctx_captured_selective_scan.__qualname__ = WRAPPER_NAME
    longctx_captured_selective_scan.__doc__ = getattr(original, "__doc__", None)
    longctx_captured_selective_scan.__wrapped__ = original  # type: ignore[attr-defined]
    longctx_captured_selective_scan._longctx_capture = True  # type: ignore[attr-defined]
    return longctx_captured_selective_scan


def _supported(u, delta, A, B, C, D, z, delta_bias, mamba_ssm: bool) -> bool:
    tensors = [u, delta, A, B, C] + [t for t in (D, z, delta_bias) if t is not None]
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return False
    if any(t.is_complex() or not t.is_floating_point() for t in tensors):
        return False
    if u.dim() != 3 or A.dim() != 2:
        return False
    # transformers' function handles [B, N, T] only; mamba_ssm's also the grouped layout.
    if B.dim() != 3 and not (mamba_ssm and B.dim() == 4):
        return False
    return B.dim() == C.dim()


def _canonical(u, delta, A, B, C, D, z, delta_bias, delta_softplus: bool, return_last_state: bool, source: str, mamba_ssm: bool, function: str):
    tensors = [u, delta, A, B, C] + [t for t in (D, z, delta_bias) if t is not None]
    # At least the precision of the original: float64 if anything is float64, else float32.
    cdt = _promote(torch.float32, *(t.dtype for t in tensors))
    if mamba_ssm:
        # mamba_ssm returns u's dtype; its last state is in the (float32) compute dtype.
        out_dtype, state_dtype = u.dtype, cdt
    else:
        # transformers: matmul(state.to(u.dtype), C), then + u * D (promotes), then * silu(z).
        out_dtype = u.dtype
        if D is not None:
            out_dtype = _promote(out_dtype, u.dtype, D.dtype)
        if z is not None:
            out_dtype = _promote(out_dtype, z.dtype)
        # The recurrent state: zeros(u.dtype) * exp(A·dt) + dt·B.float()·u.float().
        state_dtype = _promote(u.dtype, A.dtype, delta.dtype, torch.float32)
    with _annotate(source, _precision_note(u, delta, A, B, C, D, z, delta_bias, cdt, function, mamba_ssm)):
        y, final, _ = torch.ops.longctx.selective_scan_fwd.default(
            u.to(cdt), delta.to(cdt), A, B.to(cdt), C.to(cdt), D,
            None if z is None else z.to(cdt), delta_bias, delta_softplus, None, 0, "exact", 0,
        )
    y = y.to(out_dtype)
    if return_last_state:
        return y, final.to(state_dtype)
    return y
