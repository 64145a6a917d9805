"""The public verbs: :func:`optimize` and :func:`explain`.

::

    model = optimize(model)                           # an nn.Module
    model = optimize(model, attention={"chunk_size": 4096}, backend="aot_eager")
    step = optimize(train_step)                       # a function

    @optimize
    def f(x): ...

    @optimize(config=Config(strict=True))
    def g(x): ...

    print(model.report)                               # what the latest compilation rewrote
    print(explain(model, input_ids, labels=labels))   # the same, without compiling for training
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Mapping

import torch

from longctx_compiler.backend import LongctxBackend, PassFailure, quiet_checkpoint_policy_warning
from longctx_compiler.capture import capture_context
from longctx_compiler.config import Config
from longctx_compiler.report import RewriteReport

__all__ = ["optimize", "explain", "OptimizedModule", "OptimizedFunction"]


def _resolve_config(config: Config | None, overrides: Mapping[str, Any]) -> Config:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a longctx_compiler.Config, got {type(config).__name__}")
    base = config or Config()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**overrides) if overrides else base


def _mark_sequence_dynamic(config: Config, args: tuple, kwargs: dict) -> None:
    # The sequence length is the size that changes between calls (curriculum, packing, eval
    # at another length). Marking it dynamic up front compiles one graph for every length
    # instead of one per length. ``maybe_mark_dynamic`` lets Dynamo specialise when the model
    # truly needs a static size, rather than failing.
    dim = config.sequence_dim
    if dim is None:
        return
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, torch.Tensor) and value.dim() > dim and value.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(value, dim)


class _Compiled:
    """The shared part of a module or function wrapper: backend, compiled callable, report."""

    def __init__(self, target: Callable[..., Any], config: Config) -> None:
        self._lc_config = config
        self._lc_backend = LongctxBackend(config)
        self._lc_compiled = torch.compile(target, backend=self._lc_backend)
        self._lc_report = RewriteReport()

    def _lc_call(self, args: tuple, kwargs: dict) -> Any:
        _mark_sequence_dynamic(self._lc_config, args, kwargs)
        before = self._lc_backend.compile_count
        pending = self._lc_backend.start_report()
        try:
            with capture_context(self._lc_config):
                out = self._lc_compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            # Dynamo wraps errors raised by a backend; with strict=True the user asked for our
            # error, so surface it unwrapped.
            inner = getattr(exc, "inner_exception", None)
            if isinstance(inner, PassFailure):
                raise inner from exc
            raise
        if self._lc_backend.compile_count != before:
            self._lc_report = pending
        return out


class _Views:
    """What both wrappers show the user: the latest report, the config, the compile count."""

    _lc: _Compiled

    @property
    def report(self) -> RewriteReport:
        """The :class:`RewriteReport` of the latest compilation."""
        return self._lc._lc_report

    @property
    def longctx_config(self) -> Config:
        return self._lc._lc_config

    @property
    def compile_count(self) -> int:
        """Graphs compiled so far (a changed sequence length adds none)."""
        return self._lc._lc_backend.compile_count


class OptimizedModule(_Views, torch.nn.Module):
    """An ``nn.Module`` that runs the wrapped module through the longctx compiler.

    It *is* the original module as far as training code can tell: the same parameter
    objects, the same ``state_dict`` keys (no ``_orig_mod.`` prefix), ``train()``/``eval()``
    reach the original, and unknown attributes (``config``, ``generate``, ...) are looked up
    on it.

    Attributes:
        report: the :class:`RewriteReport` of the latest compilation.
        longctx_config: the :class:`Config` in use (``config`` stays the wrapped model's).
        compile_count: graphs compiled so far (a changed sequence length adds none).
    """

    def __init__(self, module: torch.nn.Module, config: Config) -> None:
        super().__init__()
        # Registered under a private name; state_dict and parameter views are delegated below
        # so the wrapper adds no key prefix.
        self._orig_mod = module
        object.__setattr__(self, "_lc", _Compiled(module, config))

    # -- running --------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._lc._lc_call(args, kwargs)

    # -- what the user inspects -------------------------------------------------------------
    @property
    def config(self) -> Any:  # type: ignore[override]
        # ``config`` on a Hugging Face model is its model config; keep that meaning.
        inner = self._orig_mod
        return getattr(inner, "config") if hasattr(inner, "config") else self._lc._lc_config

    @property
    def original(self) -> torch.nn.Module:
        return self._orig_mod

    # -- the original module's identity -------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self._orig_mod.state_dict(*args, **kwargs)

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self._orig_mod.load_state_dict(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.nn.Parameter]]:  # type: ignore[override]
        return self._orig_mod.named_parameters(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        return self._orig_mod.named_buffers(*args, **kwargs)

    def named_modules(self, *args: Any, **kwargs: Any):  # type: ignore[override]
        return self._orig_mod.named_modules(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)

    def __repr__(self) -> str:
        return f"OptimizedModule({self._orig_mod.__class__.__name__}, backend={self._lc._lc_config.backend!r})"


class OptimizedFunction(_Views):
    """A function compiled through the longctx compiler; ``.report`` as for modules."""

    def __init__(self, fn: Callable[..., Any], config: Config) -> None:
        functools.update_wrapper(self, fn)
        self._lc = _Compiled(fn, config)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._lc._lc_call(args, kwargs)


def optimize(
    target: Callable[..., Any] | torch.nn.Module | None = None,
    *,
    config: Config | None = None,
    backend: str | None = None,
    strict: bool | None = None,
    **overrides: Any,
) -> Any:
    """Compile a model or function with the longctx passes.

    Usable as ``optimize(model)``, ``optimize(fn)``, ``@optimize`` and
    ``@optimize(config=..., backend=..., strict=...)``.

    Args:
        target: an ``nn.Module`` or a callable. Omit it to get a decorator.
        config: a :class:`Config` (default: ``Config()``).
        backend: ``"inductor"`` (default) or ``"aot_eager"``; overrides ``config.backend``.
        strict: raise on a pass failure instead of falling back; overrides ``config.strict``.
        **overrides: other :class:`Config` fields, e.g. ``attention={"chunk_size": 4096}``.

    Returns:
        an :class:`OptimizedModule` for a module (same parameters and ``state_dict`` keys),
        an :class:`OptimizedFunction` for a function. Its ``.report`` tells what was rewritten.

    Raises:
        TypeError: ``target`` is not callable, or unknown config fields.
        ValueError: invalid config values (unknown backend, non-positive chunk sizes, ...).
    """
    cfg = _resolve_config(config, {"backend": backend, "strict": strict, **overrides})
    if target is None:
        return lambda t: optimize(t, config=cfg)
    if isinstance(target, (OptimizedModule, OptimizedFunction)):
        raise TypeError("this object is already optimized; optimize the original (its .original) instead")
    if isinstance(target, torch.nn.Module):
        return OptimizedModule(target, cfg)
    if isinstance(target, type):
        raise TypeError(f"optimize() takes a model instance or a function, not the class {target.__name__}; instantiate it first")
    if callable(target):
        return OptimizedFunction(target, cfg)
    raise TypeError(f"optimize() takes an nn.Module or a callable, got {type(target).__name__}")


def explain(target: Callable[..., Any] | torch.nn.Module, *args: Any, config: Config | None = None, **kwargs: Any) -> RewriteReport:
    """What :func:`optimize` would rewrite, for these example inputs, without compiling.

    The target is captured by Dynamo and our passes run on the captured graphs; the rewritten
    graphs then run once in Python (no AOTAutograd, no code generation, no backward) so that
    Dynamo can capture every graph of the program. Parameters are not changed.

    Returns:
        the :class:`RewriteReport`.
    """
    if isinstance(target, (OptimizedModule, OptimizedFunction)):
        config = config or target.longctx_config
        target = target.original if isinstance(target, OptimizedModule) else target.__wrapped__
    if not callable(target):
        raise TypeError(f"explain() takes an nn.Module or a callable, got {type(target).__name__}")
    cfg = _resolve_config(config, {})
    backend = LongctxBackend(cfg, compile=False)
    report = backend.start_report()
    _mark_sequence_dynamic(cfg, args, kwargs)
    compiled = torch.compile(target, backend=backend)
    with torch.no_grad(), capture_context(cfg), quiet_checkpoint_policy_warning():
        compiled(*args, **kwargs)
    return report
