"""Capture-time recognition of known scan functions: Mamba-1 selective scans and Mamba-2 SSD
chunk scans.

Libraries spell these scans as *functions*: the Mamba scan (``transformers``'
``mamba_selective_scan``, ``mamba_ssm``'s ``selective_scan_fn``/``selective_scan_ref``) and the
Mamba-2 SSD scan (``transformers``' ``mamba2_chunk_scan`` in the Mamba2, Zamba2, Bamba, FalconH1,
GraniteMoeHybrid and NemotronH model files, ``mamba_ssm``'s ``mamba_chunk_scan_combined``).
Traced by Dynamo, their torch paths become a Python loop unrolled over T, an unrolled
log-depth tree of vmapped combines (``associative_scan`` in "generic" mode, what
``transformers`` picks on CPU), or — the SSD chunk form — ``[B, H, C, Q, Q]`` decay matrices and
per-chunk states that autograd keeps: nothing in the graph is one node. Instead of
recognising those shapes afterwards, we recognise the *function* and substitute it while
Dynamo traces::

    with capture_context(config):
        compiled(*args, **kwargs)        # every call, not only the first

Inside the context each recognised function, looked up by its defining module's globals,
is replaced by a wrapper that

* while compiling (``torch.compiler.is_compiling()``, constant-folded by Dynamo) calls the
  canonical op in exactly the original function's semantics, unplanned (``chunk_size = 0``,
  planned later by a pass): ``longctx::selective_scan_fwd`` for a selective scan,
  ``longctx::ssd_fwd`` for an SSD chunk scan, and
* otherwise calls the original function (eager behaviour is untouched).

A call the op cannot reproduce exactly (an argument combination the op does not cover, see
below) runs the original function inside the compiled graph, and its nodes carry the reason
(:data:`REFUSED_KEY`, :func:`refusal_of`) for the report.

**Why every call.** Dynamo guards on the identity of the globals a frame read: the mixer's
``forward`` read ``mamba_selective_scan`` from its module, so the guard checks that the
global is still our wrapper. The wrappers are created once per (module, name) and cached,
so every call inside the context sees the same objects and the guards hold: no recompile.
Outside the context the originals are restored (plain ``torch.compile`` or eager runs of
the same model in the same process see the library's own function).

**Recognition** is by name and signature, not identity: a module-level function of an
imported ``transformers.models.*`` module (or of ``mamba_ssm``'s module of that family) whose
name contains the family's word and whose parameters start with the family's argument list
(:data:`FAMILIES`):

* *selective scan*: ``selective_scan`` in the name (``selective_state_update``, the one-step
  decoder function, is not a scan), parameters ``(u|hidden_states|x, delta|dt, A, B, C, D, z,
  delta_bias, delta_softplus, return_last_state)``; ``mamba_ssm.ops.selective_scan_interface``.
  That covers the copies in Mamba, FalconMamba, Jamba and Zamba. ``mamba_ssm``'s fused
  ``mamba_inner_fn`` (conv1d + projections + scan + out projection in one kernel) is left
  alone: the canonical op covers the scan only.
* *SSD chunk scan*: ``chunk_scan`` in the name, parameters ``(hidden_states|x|u, dt, A, B, C,
  chunk_size)`` (``mamba_ssm``'s ``mamba_chunk_scan_combined`` signature, which transformers
  copies); ``mamba_ssm.ops.triton.ssd_combined.mamba_chunk_scan_combined``. The fused
  ``mamba2_split_conv1d_scan_combined`` (conv, scan, gated norm and out projection in one
  kernel; ``None`` on transformers' torch path) and the one-step ``selective_state_update``
  are left alone. The model's ``chunk_size`` goes to the planning pass
  (:data:`CHUNK_KEY`); ``seq_idx`` (packed documents) is taken from the keyword arguments
  with ``mamba_ssm``'s semantics — where transformers' torch path refuses packed sequences,
  the op keeps the documents apart.

``transformers`` wraps each such function in a dispatcher that calls ``mamba_ssm``'s kernel
when it is installed; the wrapper then reproduces ``mamba_ssm``'s semantics instead of the
torch path's (:func:`_delegates_to_mamba_ssm`).

**Provenance.** The wrapper emits the op inside ``torch.fx.traceback.annotate({...})`` where
available, so the op node carries ``node.meta["custom"]["longctx_source"]`` (e.g.
``"transformers mamba scan"``, ``"transformers bamba chunk scan"``); on torch builds without
``annotate`` the passes read the wrapper's frame name in ``node.meta["stack_trace"]`` instead
(:func:`source_of`).

**Dtypes.** The op computes in float64 when any input is float64 and in float32 otherwise
(never less precise than the original) and the wrapper casts the outputs to the dtypes the
original returns. Where that is more precise than the original the node carries a note
(:data:`PRECISION_KEY`) that the report shows as the rewrite's ``details["precision"]``:

* ``transformers``' ``mamba_selective_scan`` computes partly in float32 (it casts B and u with
  ``.float()``), partly in the dtype of ``dt`` (the bias add and softplus), and returns a
  dtype given by torch's promotion of ``hidden_states``, ``D`` and ``z``: a float64 model's B
  and u are rounded to float32 there; 16-bit activations (e.g. under ``torch.autocast``) have
  Δ, the readout's state and ``silu(z)`` in 16 bits there.
* ``transformers``' ``mamba2_chunk_scan`` computes Δ (bias add, softplus, clamp) in dt's dtype,
  then rounds x, B, C and Δ to float32 (``.float()``) and runs the whole chunk form in
  float32; it returns ``float32 (+ D·x in D's dtype)`` — float32, or D's dtype where that is
  wider — and a float32 final state.
* ``mamba_ssm``'s kernels compute in float32 and return x's dtype (the SSD final state in
  float32).
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

# Importing the op modules registers torch.ops.longctx.selective_scan_fwd/_bwd and ssd_fwd/_bwd.
from longctx_compiler.kernels.selective_scan import op as _op  # noqa: F401
from longctx_compiler.kernels.ssd import op as _ssd_op  # noqa: F401
from longctx_compiler.kernels.selective_scan.schema import ScanArgs
from longctx_compiler.kernels.ssd._args import validate as _validate_ssd
from longctx_compiler.kernels.ssd.schema import SSDArgs

__all__ = [
    "capture_context", "captured_functions", "source_of", "precision_of", "model_chunk_of", "refusal_of",
    "SOURCE_KEY", "PRECISION_KEY", "CHUNK_KEY", "REFUSED_KEY", "WRAPPER_NAME", "FAMILIES",
]

log = logging.getLogger("longctx_compiler")

#: Key in ``node.meta["custom"]`` naming the library function a canonical node came from.
SOURCE_KEY = "longctx_source"
#: Key in ``node.meta["custom"]``: where the op computes more precisely than the library
#: function it replaces (the casts of the original it does not reproduce), for the report.
PRECISION_KEY = "longctx_precision"
#: Key in ``node.meta["custom"]`` of a captured SSD node: the ``chunk_size`` the model passed
#: (an int when it is a positive int, else its ``repr``), for the planning pass.
CHUNK_KEY = "longctx_model_chunk_size"
#: Key in ``node.meta["custom"]`` of the nodes of a recognised call that runs the library's
#: own function: ``(family, source, reason)``.
REFUSED_KEY = "longctx_capture_refused"
#: The wrappers' code name: visible in ``node.meta["stack_trace"]`` of the op node.
WRAPPER_NAME = "longctx_captured_scan"

_SELECTIVE_SCAN = "selective_scan"
_SSD = "ssd"
_TORCH_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class _Family:
    """A family of library scan functions: how to recognise one and what replaces a call.

    ``substitute(call)`` runs while Dynamo traces: it returns the canonical op's result in the
    original's semantics, or a string (why the op cannot reproduce this call; the original then
    runs). It returns instead of raising because Dynamo traces it: a reason must be a constant.
    """

    key: str
    word: str  # the function's name contains it
    params: tuple[tuple[str, ...], ...]  # allowed names of the leading parameters, in order
    mamba_ssm_module: str
    mamba_ssm_names: frozenset[str] | None  # the only functions of that module (None: any)
    label: str  # "scan" / "chunk scan": the report's name for it
    substitute: Callable[["_Call"], Any]


@dataclass(frozen=True)
class _Signature:
    """The parameters of a recognised function (positional-or-keyword ones in order)."""

    names: tuple[str, ...]
    defaults: tuple[tuple[str, Any], ...]
    var_keyword: bool


@dataclass(frozen=True)
class _Call:
    """One call of a recognised function, its arguments bound by parameter name.

    ``args``: every named parameter (defaults filled in); ``extra``: keyword arguments the
    signature takes through ``**kwargs``; ``leading``: the names of the family's leading
    parameters as this function spells them.
    """

    args: dict[str, Any]
    extra: dict[str, Any]
    leading: tuple[str, ...]
    source: str
    function: str  # "transformers' mamba2_chunk_scan": how the report names the original
    mamba_ssm: bool  # mamba_ssm's semantics (its own function, or transformers calling it)

    def get(self, name: str, default: Any = None) -> Any:
        """A parameter by name, from the signature or from ``**kwargs``."""
        if name in self.args:
            return self.args[name]
        return self.extra.get(name, default)


@dataclass(frozen=True)
class _Site:
    module: str
    name: str
    original: Callable[..., Any]
    wrapper: Callable[..., Any]
    source: str
    family: str


_lock = threading.RLock()
_sites: dict[tuple[str, str], _Site] = {}
_scanned: dict[str, int] = {}
_depth = 0


def _signature(fn: Callable[..., Any], family: _Family) -> _Signature | None:
    """``fn``'s parameters if they start with the family's argument list, else None."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None
    named = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(named) < len(family.params):
        return None
    for p, allowed in zip(named, family.params):
        if p.name not in allowed:
            return None
    defaults = tuple((p.name, p.default) for p in named if p.default is not p.empty)
    return _Signature(tuple(p.name for p in named), defaults, any(p.kind == p.VAR_KEYWORD for p in params))


def _bind(sig: _Signature, args: tuple, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | str:
    """``(named arguments with defaults, extra keyword arguments)``, or why they do not bind."""
    if len(args) > len(sig.names):
        return "more positional arguments than the signature names"
    bound = dict(sig.defaults)
    bound.update(zip(sig.names, args))
    extra = {}
    for name, value in kwargs.items():
        if name in sig.names[: len(args)]:
            return "an argument given both by position and by keyword"
        if name in sig.names:
            bound[name] = value
        elif sig.var_keyword:
            extra[name] = value
        else:
            return "an unexpected keyword argument"
    if any(name not in bound for name in sig.names):
        return "a required argument is missing"
    return bound, extra


def _source_label(module_name: str, family: _Family) -> str:
    if module_name.startswith("transformers.models."):
        return f"transformers {module_name.split('.')[2]} {family.label}"
    return f"{module_name.split('.')[0]} {family.label}"


def _is_candidate(module_name: str, name: str, fn: Any, family: _Family) -> bool:
    if not callable(fn) or family.word not in name or isinstance(fn, type):
        return False
    if module_name == family.mamba_ssm_module and family.mamba_ssm_names is not None and name not in family.mamba_ssm_names:
        return False
    # Another module's function imported by name is recognised where it is defined.
    defined_in = getattr(fn, "__module__", None)
    return defined_in == module_name or getattr(getattr(fn, "__wrapped__", None), "__module__", None) == module_name


def _delegates_to_mamba_ssm(fn: Callable[..., Any]) -> bool:
    """Whether ``transformers``' dispatcher around ``fn`` calls ``mamba_ssm``'s kernel (it does
    when ``mamba_ssm`` was importable when the model file was imported)."""
    try:
        impl = inspect.getclosurevars(fn).nonlocals.get("implementation")
    except (TypeError, ValueError):
        return False
    return (getattr(impl, "__module__", None) or "").startswith("mamba_ssm")


def _scan_module(module_name: str, module: ModuleType) -> None:
    for name, fn in list(vars(module).items()):
        if isinstance(fn, functools.partial) or getattr(fn, "_longctx_capture", False):
            continue
        for family in FAMILIES:
            if module_name != family.mamba_ssm_module and not module_name.startswith("transformers.models."):
                continue
            if not _is_candidate(module_name, name, fn, family):
                continue
            sig = _signature(fn, family)
            if sig is None:
                continue
            source = _source_label(module_name, family)
            mamba_ssm = module_name.startswith("mamba_ssm") or _delegates_to_mamba_ssm(fn)
            wrapper = _make_wrapper(fn, sig, family, source, mamba_ssm=mamba_ssm)
            _sites[(module_name, name)] = _Site(module_name, name, fn, wrapper, source, family.key)
            log.debug("capture: recognised %s.%s as a %s", module_name, name, family.label)
            break


def _discover() -> list[_Site]:
    # Rescan only modules imported since the last call (a model file imported later is found
    # on the next call; the already-seen ones cost a dictionary lookup).
    mamba_ssm_modules = {f.mamba_ssm_module for f in FAMILIES}
    for module_name, module in list(sys.modules.items()):
        if module is None or module_name in _scanned:
            continue
        if not (module_name.startswith("transformers.models.") or module_name in mamba_ssm_modules):
            continue
        _scanned[module_name] = id(module)
        _scan_module(module_name, module)
    return list(_sites.values())


def captured_functions() -> list[tuple[str, str, str]]:
    """``(module, function, source label)`` of every scan function recognised so far."""
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


def _custom(node: torch.fx.Node) -> dict[str, Any]:
    custom = node.meta.get("custom") or {}
    return custom if isinstance(custom, dict) else {}


def source_of(node: torch.fx.Node) -> str | None:
    """The library function a canonical scan node was captured from, if any."""
    custom = _custom(node)
    if SOURCE_KEY in custom:
        return custom[SOURCE_KEY]
    trace = node.meta.get("stack_trace") or ""
    if f"in {WRAPPER_NAME}" in trace:
        label = "chunk scan" if node.target is torch.ops.longctx.ssd_fwd.default else "scan"
        files = re.findall(r'File "([^"]+)", line \d+, in (\S+)', trace)
        callers = [f for f, fn in files if fn != WRAPPER_NAME and "longctx_compiler" not in f]
        if callers:
            m = re.search(r"models/([^/]+)/modeling_", callers[-1])
            return f"transformers {m.group(1)} {label}" if m else f"captured {label}"
        return f"captured {label}"
    return None


def precision_of(node: torch.fx.Node) -> str | None:
    """The captured node's precision note (see :data:`PRECISION_KEY`), if any."""
    return _custom(node).get(PRECISION_KEY)


def model_chunk_of(node: torch.fx.Node) -> int | str | None:
    """The ``chunk_size`` the model passed to a captured SSD scan (see :data:`CHUNK_KEY`), if known."""
    return _custom(node).get(CHUNK_KEY)


def refusal_of(node: torch.fx.Node) -> tuple[str, str, str] | None:
    """``(family, source, reason)`` when ``node`` belongs to a recognised call that runs the
    library's own function (see :data:`REFUSED_KEY`); family is ``"selective_scan"`` or ``"ssd"``."""
    value = _custom(node).get(REFUSED_KEY)
    return tuple(value) if value else None


def _annotate(annotation: dict[str, Any]):
    annotate = getattr(torch.fx.traceback, "annotate", None)
    if annotate is None:
        return contextlib.nullcontext()
    return annotate({k: v for k, v in annotation.items() if v is not None})


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _bits(dtype: torch.dtype) -> int:
    return round(-math.log2(torch.finfo(dtype).eps))


def _promote(*dtypes: torch.dtype) -> torch.dtype:
    out = dtypes[0]
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def _note(cdt: torch.dtype, function: str, lossy: list[str]) -> str | None:
    """The precision note: what ``function`` rounds that the op, computing in ``cdt``, does not."""
    if not lossy:
        return None
    return f"computes in {_name(cdt)} where {function} " + ", ".join(lossy)


def _real_floats(tensors: dict[str, Any]) -> str | None:
    """Why the named tensors (None: omitted) are not all real floating-point tensors, or None."""
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            return f"{name} is not a tensor"
        if t.dtype not in _TORCH_FLOATS:
            return f"{name} has dtype {_name(t.dtype)}; the op is defined for real float16/bfloat16/float32/float64"
    return None


def _make_wrapper(original: Callable[..., Any], sig: _Signature, family: _Family, source: str, *, mamba_ssm: bool) -> Callable[..., Any]:
    # "transformers' mamba_selective_scan": how the report names the function it replaced.
    library = (getattr(original, "__module__", None) or source).split(".")[0]
    function = f"{library}{chr(39) if library.endswith('s') else chr(39) + 's'} {getattr(original, '__name__', 'scan')}"
    leading = sig.names[: len(family.params)]

    def longctx_captured_scan(*args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return original(*args, **kwargs)
        bound = _bind(sig, args, kwargs)
        result = bound if isinstance(bound, str) else family.substitute(
            _Call(bound[0], bound[1], leading, source, function, mamba_ssm))
        if not isinstance(result, str):
            return result
        # Not reproducible by the op: the library's function runs inside the graph, its nodes
        # marked with the reason so that the report can say why this call was left alone.
        with _annotate({REFUSED_KEY: (family.key, source, result)}):
            return original(*args, **kwargs)

    longctx_captured_scan.__name__ = WRAPPER_NAME
    longctx_captured_scan.__qualname__ = WRAPPER_NAME
    longctx_captured_scan.__doc__ = getattr(original, "__doc__", None)
    longctx_captured_scan.__wrapped__ = original  # type: ignore[attr-defined]
    longctx_captured_scan._longctx_capture = True  # type: ignore[attr-defined]
    return longctx_captured_scan


# -- Mamba-1 selective scan ---------------------------------------------------------------------
_SELECTIVE_SCAN_PARAMS = (("u", "hidden_states", "x"), ("delta", "dt"), ("A",), ("B",), ("C",), ("D",), ("z",), ("delta_bias",),
                          ("delta_softplus",), ("return_last_state",))
#: Path switches of transformers' function: the same semantics on every path.
_PATH_SWITCHES = ("use_mambapy", "use_associative_scan")


def _selective_scan(call: _Call) -> Any:
    names = call.leading
    # Anything beyond the Mamba arguments and transformers' path switches (packed sequences:
    # cu_seqlens/seq_idx, ...) is not the op's: it goes to the original.
    others = {k: v for k, v in call.args.items() if k not in names and k not in _PATH_SWITCHES}
    others.update({k: v for k, v in call.extra.items() if k not in _PATH_SWITCHES})
    if any(v is not None for v in others.values()):
        return "arguments beyond the selective scan's (packed sequences, ...)"
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state = (call.args[n] for n in names)
    why = _real_floats({"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias})
    if why:
        return why
    if u.dim() != 3 or A.dim() != 2:
        return "u must be [B, D, T] and A [D, N]"
    # transformers' function handles [B, N, T] only; mamba_ssm's also the grouped layout.
    if (B.dim() != 3 and not (call.mamba_ssm and B.dim() == 4)) or B.dim() != C.dim():
        return "B and C must be [B, N, T] (or grouped [B, G, N, T] for mamba_ssm)"
    tensors = [u, delta, A, B, C] + [t for t in (D, z, delta_bias) if t is not None]
    # At least the precision of the original: float64 if anything is float64, else float32.
    cdt = _promote(torch.float32, *(t.dtype for t in tensors))
    if call.mamba_ssm:
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
    note = _selective_scan_precision(u, delta, A, B, z, delta_bias, cdt, call)
    with _annotate({SOURCE_KEY: call.source, PRECISION_KEY: note}):
        y, final, _ = torch.ops.longctx.selective_scan_fwd.default(*ScanArgs(
            u.to(cdt), delta.to(cdt), A, B.to(cdt), C.to(cdt), D,
            None if z is None else z.to(cdt), delta_bias, bool(delta_softplus),
        ))
    y = y.to(out_dtype)
    if return_last_state:
        return y, final.to(state_dtype)
    return y


def _selective_scan_precision(u, delta, A, B, z, delta_bias, cdt: torch.dtype, call: _Call) -> str | None:
    """What the original rounds that the canonical op (computing in ``cdt``) does not.

    ``transformers``' ``mamba_selective_scan``: ``delta_bias.to(dt.dtype)``, the bias add and
    softplus in Δ's dtype, ``B.float()`` and ``hidden_states.float()``, the state rounded to the
    input dtype for the readout ``matmul(state.to(u.dtype), C)``, ``silu(z)`` in z's dtype.
    ``mamba_ssm``'s scans compute in float32. (Under autocast the original's readout matmul runs
    in the autocast dtype; its inputs are the autocast dtype there already, so the note on the
    state's rounding covers it.)
    """
    lossy = []
    if call.mamba_ssm:
        if _bits(cdt) > _bits(torch.float32):
            lossy.append("computes the whole scan in float32")
        return _note(cdt, call.function, lossy)
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
    return _note(cdt, call.function, lossy)


# -- Mamba-2 SSD chunk scan ---------------------------------------------------------------------
_SSD_PARAMS = (("hidden_states", "x", "u"), ("dt",), ("A",), ("B",), ("C",), ("chunk_size",))


def _ssd(call: _Call) -> Any:
    x, dt, A, B, C, chunk = (call.args[n] for n in call.leading)
    D, z, dt_bias, h0 = call.get("D"), call.get("z"), call.get("dt_bias"), call.get("initial_states")
    seq_idx, cu_seqlens = call.get("seq_idx"), call.get("cu_seqlens")
    dt_softplus, dt_limit = call.get("dt_softplus", False), call.get("dt_limit", (0.0, math.inf))
    why = _real_floats({"x": x, "dt": dt, "A": A, "B": B, "C": C, "D": D, "z": z, "dt_bias": dt_bias, "initial_states": h0})
    if why:
        return why
    if z is not None and not call.mamba_ssm:
        # transformers' torch path drops z (it is not one of its parameters); mamba_ssm applies it.
        return "z is given, which transformers' torch path ignores (mamba_ssm's kernel applies it)"
    if call.get("return_varlen_states"):
        return "return_varlen_states (per-document final states) is not computed by the op"
    if cu_seqlens is not None and seq_idx is None:
        return "packed documents given by cu_seqlens without seq_idx: the op keeps documents apart by seq_idx"
    if seq_idx is not None and (not isinstance(seq_idx, torch.Tensor) or seq_idx.dtype not in (torch.int32, torch.int64)):
        return "seq_idx is not an int32/int64 tensor"
    if not isinstance(dt_softplus, (bool, int)):
        return "dt_softplus is not a Python bool"
    limits = _dt_limits(dt_limit)
    if isinstance(limits, str):
        return limits
    if x.dim() != 4 or dt.dim() != 3 or A.dim() != 1 or B.dim() != 4 or C.dim() != 4:
        return "x, dt, A, B, C are not [B, T, H, P], [B, T, H], [H], [B, T, G, N], [B, T, G, N]"
    if D is not None and D.dim() != 1 and not call.mamba_ssm:
        # transformers multiplies D[..., None] into [B, T, H, P]: a per-head D only.
        return "D is not [H], the only layout transformers' torch path broadcasts"
    tensors = [x, dt, A, B, C] + [t for t in (D, z, dt_bias, h0) if t is not None]
    # At least the precision of the original: float64 if anything is float64, else float32.
    cdt = _promote(torch.float32, *(t.dtype for t in tensors))
    if call.mamba_ssm:
        out_dtype = x.dtype
    else:
        # transformers: float32 chunk form, then + D[..., None] * x.float() (promotes with D).
        out_dtype = torch.float32 if D is None else _promote(torch.float32, D.dtype)
    note = _ssd_precision(call, cdt)
    # Activations go in the compute dtype, so the op's output (x's dtype) is in it too.
    x, dt, B, C = (t.to(cdt) for t in (x, dt, B, C))
    z = None if z is None else z.to(cdt)
    # What the op checks itself (shapes across x, dt, B, C, ...): the library rejects it too.
    _validate_ssd(x, dt, A, B, C, D, z, dt_bias, h0, seq_idx)
    model_chunk = chunk if isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1 else repr(chunk)
    with _annotate({SOURCE_KEY: call.source, PRECISION_KEY: note, CHUNK_KEY: model_chunk}):
        out, final, _ = torch.ops.longctx.ssd_fwd.default(*SSDArgs(
            x, dt, A, B, C, D, z, dt_bias, bool(dt_softplus), limits[0], limits[1], h0, seq_idx,
        ))
    out = out.to(out_dtype)
    if call.get("return_final_states"):
        # transformers: the state passing runs in float32; mamba_ssm: its final states are float32.
        return out, final.to(torch.float32)
    return out


def _dt_limits(dt_limit: Any) -> tuple[float, float] | str:
    """``dt_limit`` as the op's ``(lo, hi)`` (None or an end None: unbounded), or why not."""
    if dt_limit is None:
        return -math.inf, math.inf
    if not isinstance(dt_limit, (tuple, list)) or len(dt_limit) != 2:
        return "dt_limit is not a pair (lo, hi)"
    lo, hi = dt_limit
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (lo, hi)):
        return "dt_limit is not a pair of Python numbers"
    lo = -math.inf if lo is None else float(lo)
    hi = math.inf if hi is None else float(hi)
    if not lo <= hi:
        return "dt_limit has lo > hi"
    return lo, hi


def _ssd_precision(call: _Call, cdt: torch.dtype) -> str | None:
    """What the original rounds that the op (computing in ``cdt``) does not.

    ``transformers``' ``mamba2_chunk_scan``: ``dt_bias.to(dt.dtype)``, Δ (bias add, softplus,
    clamp) in dt's dtype, ``.float()`` of x, B, C and Δ, the initial state ``.to(float32)``, the
    whole chunk form in float32. ``mamba_ssm``'s kernels compute in float32.
    """
    lossy = []
    if call.mamba_ssm:
        if _bits(cdt) > _bits(torch.float32):
            lossy.append("computes the whole scan in float32")
        return _note(cdt, call.function, lossy)
    x, dt, _, B, C = (call.args[n] for n in call.leading[:5])
    dt_bias, h0 = call.get("dt_bias"), call.get("initial_states")
    if dt_bias is not None and _bits(dt_bias.dtype) > _bits(dt.dtype):
        lossy.append(f"rounds the Δ bias to {_name(dt.dtype)}")
    if _bits(dt.dtype) < _bits(cdt):
        lossy.append(f"computes Δ (bias add, softplus, clamp) in {_name(dt.dtype)}")
    narrowed = [n for n, t in (("x", x), ("B", B), ("C", C), ("Δ", dt)) if _bits(t.dtype) > _bits(torch.float32)]
    if narrowed:
        lossy.append(f"rounds {', '.join(narrowed)} to float32 (.float())")
    if h0 is not None and _bits(h0.dtype) > _bits(torch.float32):
        lossy.append("rounds the initial state to float32")
    if _bits(cdt) > _bits(torch.float32):
        lossy.append("runs the chunk form (decays, states, outputs) in float32")
    return _note(cdt, call.function, lossy)


#: The families of scan functions recognised, in the order they are tried.
FAMILIES: tuple[_Family, ...] = (
    _Family(_SELECTIVE_SCAN, "selective_scan", _SELECTIVE_SCAN_PARAMS, "mamba_ssm.ops.selective_scan_interface", None, "scan",
            _selective_scan),
    _Family(_SSD, "chunk_scan", _SSD_PARAMS, "mamba_ssm.ops.triton.ssd_combined", frozenset({"mamba_chunk_scan_combined"}),
            "chunk scan", _ssd),
)
