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

    model = optimize(model, inplace=True)             # the same object, compiled in place
    print(model.longctx.report)                       # (for Trainer, TRL, PEFT: see integrations)

Two forms for modules. ``optimize(model)`` returns an :class:`OptimizedModule` that wraps
the model and passes for it (its ``forward`` signature, ``isinstance`` checks, checkpoints).
``optimize(model, inplace=True)`` compiles the model's ``__call__`` in place, the way
``nn.Module.compile()`` does, so the object stays exactly what it was (a ``PreTrainedModel``
for Hugging Face models): that is the form to hand to training libraries that patch or wrap
the model themselves (:mod:`longctx_compiler.integrations`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
import warnings
from typing import Any, Callable, Iterator, Mapping

import torch

from longctx_compiler.backend import LongctxBackend, PassFailure, quiet_checkpoint_policy_warning
from longctx_compiler.capture import capture_context
from longctx_compiler.config import Config
from longctx_compiler.report import RewriteReport
from longctx_compiler.runtime.documents import document_ids_of, with_documents
from longctx_compiler.passes.sequence_parallel import layout_chunk
from longctx_compiler.runtime.sequence_parallel import (
    SequenceGroup, SequenceParallelError, active_group, global_loss, reduce_gradients_over, sequence_group, shard_inputs,
    simulated_group,
)

__all__ = ["optimize", "explain", "OptimizedModule", "OptimizedFunction", "BypassWarning"]


class BypassWarning(UserWarning):
    """A training step that should have gone through the longctx compiler did not."""


def _resolve_config(config: Config | None, overrides: Mapping[str, Any]) -> Config:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config must be a longctx_compiler.Config, got {type(config).__name__}")
    base = config or Config()
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return base.replace(**overrides) if overrides else base


def _mark_sequence_dynamic(config: Config, args: tuple, kwargs: dict) -> bool:
    """Mark ``config.sequence_dim`` of every tensor input dynamic.

    Returns False when there are tensor inputs but none has that dimension (the setting
    cannot apply to this call); the caller warns once.
    """
    # The sequence length is the size that changes between calls (curriculum, packing, eval
    # at another length). Marking it dynamic up front compiles one graph for every length
    # instead of one per length. ``maybe_mark_dynamic`` lets Dynamo specialise when the model
    # truly needs a static size, rather than failing.
    dim = config.sequence_dim
    if dim is None:
        return True
    tensors = [v for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    for value in tensors:
        if value.dim() > dim and value.shape[dim] > 1:
            torch._dynamo.maybe_mark_dynamic(value, dim)
    return not tensors or any(v.dim() > dim for v in tensors)


def _equal_lengths_share_a_symbol(fn: Callable[..., Any], dim: int | None) -> Callable[..., Any]:
    """``fn``, compiled so that inputs of equal sequence length have one size symbol.

    Each input's sequence dim is marked dynamic on its own (:func:`_mark_sequence_dynamic`), so
    Dynamo gives each its own symbol: ``input_ids [B, s0]`` and ``attention_mask [B, s1]``. A
    model that relates them only through a KV cache (``use_cache=True``: the mask is sized by
    the cache's key length) then leaves ``s1 == s0`` unprovable, and a pass that needs it (a
    padding mask's keys are the attention's) must refuse. Comparing the lengths here, in the
    traced code, makes Dynamo guard on the comparison and, where it holds, use one symbol for
    both; a later call whose lengths differ fails the guard and compiles its own graph.
    (The closure's name is ``fn``, a root the report's module paths start inside.)
    """

    def longctx_call(*args: Any, **kwargs: Any) -> Any:
        tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and dim is not None and v.dim() > dim]
        same = 0
        for other in tensors[1:]:
            if other.shape[dim] == tensors[0].shape[dim]:  # the branch is what Dynamo guards on
                same += 1
        return fn(*args, **kwargs)

    return longctx_call


def _traced(target: Callable[..., Any], config: Config) -> Callable[..., Any]:
    """What Dynamo traces for ``target``: its call with equal lengths sharing a symbol, and with
    packed documents the ids as the first input (:func:`with_documents`)."""
    traced = _equal_lengths_share_a_symbol(target, config.sequence_dim)
    return with_documents(traced) if config.packed_documents else traced


def _warn_sequence_dim_out_of_range(config: Config, args: tuple, kwargs: dict) -> None:
    shapes = [tuple(v.shape) for v in list(args) + list(kwargs.values()) if isinstance(v, torch.Tensor)]
    warnings.warn(
        f"longctx_compiler: Config.sequence_dim={config.sequence_dim}, but no tensor input has that dimension "
        f"(input shapes {shapes}): no size is compiled as dynamic, so each new sequence length compiles again. "
        "Set sequence_dim to the sequence dimension of your inputs (0 for [T, ...]), or None to silence this.",
        UserWarning,
        stacklevel=4,
    )


class _Compiled:
    """The shared part of a module or function wrapper: backend, compiled callable, report."""

    def __init__(self, target: Callable[..., Any], config: Config) -> None:
        self._lc_config = config
        self._lc_backend = LongctxBackend(config)
        # Sequence parallelism runs each rank on its shard: a graph break would run Python
        # between graphs on a shard unchecked, so the whole call must be one graph.
        # With packed documents the ids are the compiled callable's first input, and the whole
        # call must be one graph too: a graph break would leave the ids out of a graph whose
        # scans and attentions then mix documents.
        self._lc_compiled = torch.compile(_traced(target, config), backend=self._lc_backend,
                                          fullgraph=config.distributed.active or config.packed_documents)
        self._lc_sequence = _SequenceParallel(target, config) if config.distributed.active else None
        self._lc_report = RewriteReport()
        #: calls that went through the compiled callable (a wrapper compares it across a
        #: call to tell whether a replaced ``forward`` bypassed us)
        self._lc_calls = 0
        self._lc_checked_first_step = False
        self._lc_warned_sequence_dim = False

    def _lc_call(self, args: tuple, kwargs: dict) -> Any:
        self._lc_calls += 1
        sequence = self._lc_sequence
        if sequence is not None:
            # This rank's shard of every sequence input (the compiled graph sees L tokens).
            args, kwargs = sequence.shard(args, kwargs)
        if self._lc_config.packed_documents:
            documents, kwargs = document_ids_of(args, kwargs)
            args = (documents, *args)
        if not _mark_sequence_dynamic(self._lc_config, args, kwargs) and not self._lc_warned_sequence_dim:
            self._lc_warned_sequence_dim = True
            _warn_sequence_dim_out_of_range(self._lc_config, args, kwargs)
        before = self._lc_backend.compile_count
        pending = self._lc_backend.start_report()
        try:
            with capture_context(self._lc_config), active_group(sequence.group if sequence else None), _once_only_logging_ignored():
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
        if self._lc_config.packed_documents:
            out = out[0]  # the ids marker's copy is the second result
        if sequence is not None:
            out = global_loss(out, sequence.group)
        if not self._lc_checked_first_step and torch.is_grad_enabled():
            self._lc_checked_first_step = True
            if self._lc_backend.compile_count == 0:
                # Dynamo ran the call without handing us a graph (an outer torch.compile,
                # torch.compiler.disable, or errors suppressed by Dynamo's config): the step
                # trained without any rewrite, which the user would otherwise never learn.
                warnings.warn(
                    "longctx_compiler: the first training call ran without compiling any graph, so none of "
                    "the long-context rewrites applied. Dynamo ran it eagerly: check that the model is not "
                    "also compiled by someone else (TrainingArguments(torch_compile=True), torch.compile "
                    "around it) and that torch._dynamo.config.suppress_errors is not hiding a capture error.",
                    BypassWarning,
                    stacklevel=4,
                )
        return out


def _once_only_logging_ignored():
    """Dynamo breaks the graph at a logger call; transformers' once-only warnings
    (``logger.warning_once``, e.g. GPT-2's "loss_type=None ... Using the default loss" inside
    ``forward``) would split every training step into two graphs, the attention rewrite lost
    in the second. They are advice printed once; inside the compiled call they are skipped
    (the eager model still prints them)."""
    hf_logging = sys.modules.get("transformers.utils.logging")
    once = {getattr(hf_logging, n) for n in ("warning_once", "info_once", "warning_advice") if hasattr(hf_logging, n)}
    if not once:
        return contextlib.nullcontext()
    return torch._dynamo.config.patch(ignore_logging_functions=torch._dynamo.config.ignore_logging_functions | once)


def _module_of(target: Callable[..., Any]) -> torch.nn.Module | None:
    """The module a compiled target runs: the module itself, or the module of a bound method
    (compiled in place, the target is ``model._call_impl``); None for a function."""
    if isinstance(target, torch.nn.Module):
        return target
    owner = getattr(target, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _forward_of(target: Callable[..., Any]) -> Callable[..., Any]:
    """What names the call's arguments: the module's ``forward``, or the function itself."""
    module = _module_of(target)
    return module.forward if module is not None else target


def _refuse_fully_sharded(module: torch.nn.Module) -> None:
    """FSDP's hooks run eagerly between graphs (Dynamo skips them), and sequence parallelism
    compiles the whole call as one graph: say so, instead of Dynamo's graph-break error."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return
    for name, m in module.named_modules():
        if isinstance(m, (FSDPModule, FullyShardedDataParallel)):
            raise SequenceParallelError(
                f"sequence parallelism does not compose with FSDP inside the optimized model yet ({name or 'the model'} is "
                "fully sharded): its hooks would break the one graph each rank compiles. Keep the weights whole on each "
                "rank (DDP around the optimized model composes across sequence-parallel groups)")


class _SequenceParallel:
    """A wrapper's sequence parallelism: its group (made on the first call, collectively) and
    the gradient reduction over it (installed once on the module's parameters)."""

    def __init__(self, target: Callable[..., Any], config: Config) -> None:
        self.target, self.config = target, config
        self.group: SequenceGroup | None = None
        self.hooks: list[Any] = []

    def shard(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.group is None:
            module = _module_of(self.target)
            if module is None:
                # A function's parameters are unknown, so their gradients could not be summed
                # over the group: each rank would keep its shard's part only.
                raise SequenceParallelError("sequence parallelism needs an nn.Module (its parameters' gradients are summed over the group); optimize the model, not a function")
            _refuse_fully_sharded(module)
            dist = self.config.distributed
            self.group = sequence_group(dist.sequence_parallel, dist.process_group)
            self.hooks = reduce_gradients_over(module, self.group)
        return shard_inputs(self.group, _forward_of(self.target), args, kwargs, self.config.sequence_dim, layout_chunk(self.config))


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

    It *is* the original module as far as training code can tell:

    * the same parameter objects, the same ``state_dict`` keys (no ``_orig_mod.`` prefix);
      ``train()``/``eval()`` reach the original; unknown attributes (``config``,
      ``generate``, ``save_pretrained``, ...) are looked up on it;
    * ``forward`` has the original's signature (``inspect.signature``), so libraries that
      choose inputs by it (``transformers.Trainer`` drops dataset columns the model's
      ``forward`` does not name) see the model's arguments, not ``(*args, **kwargs)``;
    * ``isinstance(wrapper, type(original))`` holds (``__class__`` names the original's
      class; ``type(wrapper)`` is a subclass of :class:`OptimizedModule`), so code that
      treats a ``PreTrainedModel`` specially (``Trainer`` checkpoints with ``config.json``
      through ``save_pretrained``, PEFT checks) treats the wrapper as what it wraps;
    * ``copy.deepcopy`` and ``pickle`` give a new wrapper, with the same configuration,
      around a copy of the original (compiled again on its first call).

    Attributes:
        report: the :class:`RewriteReport` of the latest compilation.
        longctx_config: the :class:`Config` in use (``config`` stays the wrapped model's).
        compile_count: graphs compiled so far (a changed sequence length adds none).
    """

    def __new__(cls, module: torch.nn.Module, config: Config | None = None) -> "OptimizedModule":
        # One subclass per wrapped class, whose ``forward`` carries that class's signature
        # (see _wrapper_class); constructing OptimizedModule directly picks it too.
        if cls is OptimizedModule:
            cls = _wrapper_class(type(module))
        return super().__new__(cls)

    def __init__(self, module: torch.nn.Module, config: Config) -> None:
        super().__init__()
        # Registered under a private name; state_dict and parameter views are delegated below
        # so the wrapper adds no key prefix.
        self._orig_mod = module
        object.__setattr__(self, "_lc", _Compiled(module, config))
        object.__setattr__(self, "_lc_bypass_warned", False)

    # -- running --------------------------------------------------------------------------
    def _lc_forward(self, args: tuple, kwargs: dict) -> Any:
        return self._lc._lc_call(args, kwargs)

    # The per-class subclass replaces this with a function of the same body whose signature
    # is the wrapped class's ``forward``.
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._lc_forward(args, kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        calls = self._lc._lc_calls
        out = super().__call__(*args, **kwargs)
        if self._lc._lc_calls == calls and torch.is_grad_enabled() and not self._lc_bypass_warned:
            self._warn_bypass()
        return out

    def _warn_bypass(self) -> None:
        # Someone replaced this wrapper's ``forward`` with one that never calls it (TRL's
        # SFTTrainer does: its fused LM head calls the wrapped model's backbone directly).
        # Training still runs, eagerly and without our rewrites; say so once.
        object.__setattr__(self, "_lc_bypass_warned", True)
        replaced = self.__dict__.get("forward")
        func = getattr(replaced, "__func__", replaced)
        # The code object and globals name the function that really runs: a replacement made
        # with functools.wraps(type(model).forward) (TRL's) carries our forward's names.
        code = getattr(func, "__code__", None)
        who = getattr(code, "co_qualname", None) or getattr(func, "__qualname__", None) or type(replaced).__name__
        origin = getattr(func, "__globals__", {}).get("__name__") or getattr(func, "__module__", None)
        warnings.warn(
            f"longctx_compiler: a training call on the optimized {type(self._orig_mod).__name__} did not go "
            f"through the compiler: its forward was replaced by {who}"
            + (f" (from {origin})" if origin else "")
            + ", which calls the wrapped model directly, so no long-context rewrite applied. Compile the "
            "model in place instead, before handing it to the trainer: "
            "model = longctx_compiler.optimize(model, inplace=True).",
            BypassWarning,
            stacklevel=3,
        )

    # -- what the user inspects -------------------------------------------------------------
    @property
    def config(self) -> Any:  # type: ignore[override]
        # ``config`` on a Hugging Face model is its model config; keep that meaning.
        inner = self._orig_mod
        return getattr(inner, "config") if hasattr(inner, "config") else self._lc._lc_config

    @property
    def original(self) -> torch.nn.Module:
        return self._orig_mod

    # ``isinstance(wrapper, LlamaForCausalLM)`` and ``wrapper.__class__`` name the wrapped
    # class: Trainer saves a ``PreTrainedModel`` with ``save_pretrained`` (config.json and
    # all) but anything else as a bare state dict, and reads label names from the class's
    # ``forward``. ``type(wrapper)`` is unchanged, so the wrapper's own methods still apply.
    @property  # type: ignore[misc]
    def __class__(self) -> type:  # type: ignore[override]
        # Read without __getattr__: this runs while the wrapper is being built, too.
        inner = self.__dict__.get("_modules", {}).get("_orig_mod")
        return type(self) if inner is None else type(inner)

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
            if name == "_orig_mod":  # not built yet (or being unpickled): no delegation loop
                raise
            return getattr(self._orig_mod, name)

    def __reduce_ex__(self, protocol: int) -> tuple:
        # The compiled callable and Dynamo's caches cannot be copied or pickled: rebuild the
        # wrapper around the (copied) original, with the same configuration.
        return (_rebuild_optimized_module, (self._orig_mod, self._lc._lc_config))

    def __repr__(self) -> str:
        return f"OptimizedModule({type(self._orig_mod).__name__}, backend={self._lc._lc_config.backend!r})"


def _rebuild_optimized_module(module: torch.nn.Module, config: Config) -> OptimizedModule:
    return OptimizedModule(module, config)


_wrapper_classes: dict[type, type] = {}


def _wrapper_class(cls: type) -> type:
    """The :class:`OptimizedModule` subclass for modules of class ``cls``.

    Its ``forward`` reports ``cls.forward``'s signature, on the class (``inspect.signature
    (type(w).forward)``, which TRL copies with ``functools.wraps``) and on instances.
    """
    sub = _wrapper_classes.get(cls)
    if sub is not None:
        return sub

    def forward(self: OptimizedModule, *args: Any, **kwargs: Any) -> Any:
        return self._lc_forward(args, kwargs)

    try:
        forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        pass  # a forward without a readable signature keeps (*args, **kwargs)
    forward.__doc__ = getattr(cls.forward, "__doc__", None)
    name = f"OptimizedModule[{cls.__name__}]"
    sub = type(name, (OptimizedModule,), {"forward": forward, "__module__": __name__, "__qualname__": name})
    _wrapper_classes[cls] = sub
    return sub


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
    inplace: bool = False,
    **overrides: Any,
) -> Any:
    """Compile a model or function with the longctx passes.

    Usable as ``optimize(model)``, ``optimize(model, inplace=True)``, ``optimize(fn)``,
    ``@optimize`` and ``@optimize(config=..., backend=..., strict=...)``.

    Args:
        target: an ``nn.Module`` or a callable. Omit it to get a decorator.
        config: a :class:`Config` (default: ``Config()``).
        backend: ``"inductor"`` (default) or ``"aot_eager"``; overrides ``config.backend``.
        strict: raise on a pass failure instead of falling back; overrides ``config.strict``.
        inplace: compile the module itself (``nn.Module.compile()``'s hook) and return it: it
            stays an instance of its own class, which is what training libraries that wrap
            or patch the model expect (Trainer, TRL, PEFT: see
            :mod:`longctx_compiler.integrations`). The report is ``model.longctx.report``.
        **overrides: other :class:`Config` fields, e.g. ``attention={"chunk_size": 4096}``.

    Returns:
        an :class:`OptimizedModule` for a module (same parameters and ``state_dict`` keys),
        the module itself with ``inplace=True``, an :class:`OptimizedFunction` for a
        function. Its ``.report`` (``.longctx.report`` in place) tells what was rewritten.

    Raises:
        TypeError: ``target`` is not callable, is already optimized, ``inplace=True`` for
            something that is not an ``nn.Module``, or unknown config fields.
        ValueError: invalid config values (unknown backend, non-positive chunk sizes, ...).
    """
    from longctx_compiler import integrations

    cfg = _resolve_config(config, {"backend": backend, "strict": strict, **overrides})
    if target is None:
        return lambda t: optimize(t, config=cfg, inplace=inplace)
    if isinstance(target, (OptimizedModule, OptimizedFunction)):
        raise TypeError("this object is already optimized; optimize the original (its .original) instead")
    if integrations.state_of(target) is not None:
        raise TypeError("this model is already compiled in place by longctx_compiler (see its .longctx)")
    if inplace:
        return integrations.patch(target, cfg)
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
    from longctx_compiler import integrations

    if isinstance(target, (OptimizedModule, OptimizedFunction)):
        config = config or target.longctx_config
        target = target.original if isinstance(target, OptimizedModule) else target.__wrapped__
    state = integrations.state_of(target)
    if state is not None:
        # Compiled in place: capture its plain call (what the patch compiles), not model(...),
        # which would enter the patch's own compile.
        config = config or state.config
        target = target._call_impl
    if not callable(target):
        raise TypeError(f"explain() takes an nn.Module or a callable, got {type(target).__name__}")
    cfg = _resolve_config(config, {})
    backend = LongctxBackend(cfg, compile=False)
    report = backend.start_report()
    group = None
    if cfg.distributed.active:
        # The plan of rank 0 of a simulated group: no process group needed, no data moves.
        group = simulated_group(cfg.distributed.sequence_parallel)
        args, kwargs = shard_inputs(group, _forward_of(target), args, kwargs, cfg.sequence_dim, layout_chunk(cfg))
    if cfg.packed_documents:
        documents, kwargs = document_ids_of(args, kwargs)
        args = (documents, *args)
    _mark_sequence_dynamic(cfg, args, kwargs)
    compiled = torch.compile(_traced(target, cfg), backend=backend, fullgraph=cfg.distributed.active or cfg.packed_documents)
    with torch.no_grad(), capture_context(cfg), quiet_checkpoint_policy_warning(), active_group(group), _once_only_logging_ignored():
        compiled(*args, **kwargs)
    return report
