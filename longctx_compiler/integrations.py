"""Training libraries: Hugging Face ``Trainer``, TRL, PEFT, and how each meets the compiler.

The integration point is ``optimize(model, inplace=True)`` (:func:`patch`): the model is
compiled *in place*, through the hook PyTorch's own ``nn.Module.compile()`` uses (the
module's ``_compiled_call_impl``), and stays the very object it was::

    model = AutoModelForCausalLM.from_pretrained(...)
    model = longctx_compiler.optimize(model, inplace=True)   # returns the same object
    trainer = Trainer(model=model, args=TrainingArguments(...), train_dataset=...)
    trainer.train()
    print(model.longctx.report)                               # what was rewritten

Why this form, and not a wrapper or a ``torch.compile`` backend name:

* the object stays a ``PreTrainedModel`` of its own class: ``Trainer``'s column filtering
  (it reads ``inspect.signature(model.forward)``), its checkpoints (``save_pretrained``:
  ``config.json`` and the original weight names), ``from_pretrained``, PEFT's
  ``get_peft_model`` and TRL all see the real model;
* it compiles ``model(...)``, not a ``forward`` captured at wrap time. TRL's ``SFTTrainer``
  replaces ``model.forward`` with a fused-LM-head forward that calls the model's backbone
  directly; under a wrapper that call never reaches the compiler (the wrapper warns, see
  :class:`~longctx_compiler.api.BypassWarning`). In place, Dynamo traces whatever
  ``forward`` the model has when it is called, TRL's included, so the backbone's attention
  goes through our passes;
* PEFT after the patch works too: its wrappers call the inner model with ``model(...)``;
* ``TrainingArguments(torch_compile_backend=...)`` cannot name a backend of ours: Trainer
  hands it to ``accelerate``'s ``TorchDynamoPlugin``, which accepts only the members of its
  ``DynamoBackend`` enum (``'LONGCTX' is not a valid DynamoBackend``). A bare backend would
  also miss what :func:`~longctx_compiler.optimize` does around each call (substituting the
  known selective-scan functions while Dynamo traces, marking the sequence dimension
  dynamic, keeping a report per compilation). Leave ``torch_compile`` off: the patch *is*
  the compile, and a second compile around it would trace the plain model (the first
  training call warns when nothing went through us).

Calls that carry a KV cache (``past_key_values``/``cache``: every step of ``generate``) run the
original model eagerly: decoding appends one token per call and updates the cache in place;
there is no backward to save memory for, and compiling it would recompile per token.

``copy.deepcopy`` and ``pickle`` keep the patch (the copy is compiled again on its first
call); :func:`unpatch` removes it.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from longctx_compiler.api import BypassWarning, _Compiled
from longctx_compiler.config import Config
from longctx_compiler.report import RewriteReport

__all__ = ["LongctxState", "patch", "unpatch", "state_of", "ATTRIBUTE"]

_OUTER_COMPILE = (
    "longctx_compiler: this model is compiled in place by longctx_compiler, but another torch.compile is "
    "tracing it (TrainingArguments(torch_compile=True) or torch.compile around the model), so it is "
    "compiled without the long-context rewrites. Turn the other compile off: the in-place patch is the compile."
)

#: The attribute a patched model carries its :class:`LongctxState` under (``model.longctx``).
ATTRIBUTE = "longctx"


class LongctxState:
    """What a model compiled in place carries as ``model.longctx``.

    It is also the callable installed as the model's ``_compiled_call_impl``: ``model(...)``
    lands in :meth:`__call__`.

    Attributes:
        report: the :class:`RewriteReport` of the latest compilation.
        config: the :class:`Config` in use.
        compile_count: graphs compiled so far (a changed sequence length adds none).
    """

    def __init__(self, model: torch.nn.Module, config: Config) -> None:
        self._model = model
        self.config = config
        self._compiled: _Compiled | None = None

    # -- what the user inspects -------------------------------------------------------------
    @property
    def report(self) -> RewriteReport:
        return self._compiled._lc_report if self._compiled is not None else RewriteReport()

    @property
    def compile_count(self) -> int:
        return self._compiled._lc_backend.compile_count if self._compiled is not None else 0

    def __repr__(self) -> str:
        return f"LongctxState({type(self._model).__name__}, backend={self.config.backend!r}, compiled={self.compile_count})"

    # -- running --------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._model
        if torch.compiler.is_compiling():
            # Something else is tracing this model (a torch.compile around it, e.g.
            # TrainingArguments(torch_compile=True)): it traces the plain call, without our
            # passes, since Dynamo does not nest compiles. Say so rather than train silently
            # without the rewrites.
            warnings.warn(_OUTER_COMPILE, BypassWarning, stacklevel=2)
            return model._call_impl(*args, **kwargs)
        if _carries_cache(kwargs):
            return model._call_impl(*args, **kwargs)
        if self._compiled is None:
            # Built on first use, also after a copy or unpickling (compiled state is not copied).
            # ``_call_impl`` rather than ``forward``: a forward replaced after patching (TRL)
            # and the module's hooks are traced as they are at call time.
            self._compiled = _Compiled(model._call_impl, self.config)
        return self._compiled._lc_call(args, kwargs)

    # -- copies -----------------------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # torch's Module.__getstate__ drops ``_compiled_call_impl``; the compiled callable and
        # Dynamo's caches cannot be copied either. Keep what rebuilds them.
        return {"_model": self._model, "config": self.config}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._model = state["_model"]
        self.config = state["config"]
        self._compiled = None
        # The (copied) model may still be filling its __dict__; Module.__setstate__ updates
        # it afterwards without this key (torch dropped it), so the install survives.
        self._model.__dict__["_compiled_call_impl"] = self


#: Keyword arguments through which Hugging Face models receive a KV/SSM cache (the name
#: changed between transformers releases: ``past_key_values``, ``cache``; Mamba's ``cache_params``).
_CACHE_KWARGS = ("past_key_values", "cache", "cache_params")


def _carries_cache(kwargs: dict[str, Any]) -> bool:
    """Whether a call is a decoding step: it hands the model a cache to read and update."""
    for name, value in kwargs.items():
        if value is None:
            continue
        if name in _CACHE_KWARGS:
            return True
        cls = type(value)
        if cls.__module__.startswith("transformers") and cls.__name__.endswith("Cache"):
            return True
    return False


def state_of(model: Any) -> LongctxState | None:
    """The :class:`LongctxState` of a model compiled in place, else None."""
    if not isinstance(model, torch.nn.Module):
        return None
    state = model.__dict__.get(ATTRIBUTE)
    return state if isinstance(state, LongctxState) else None


def patch(model: torch.nn.Module, config: Config) -> torch.nn.Module:
    """Compile ``model`` in place with the longctx passes; return the same object.

    Prefer ``longctx_compiler.optimize(model, inplace=True, ...)``, which builds the
    :class:`Config` from keyword overrides and calls this.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``, is an optimized wrapper, is already
            compiled in place, or was compiled with ``model.compile()``.
    """
    from longctx_compiler.api import OptimizedModule

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"optimize(..., inplace=True) takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, OptimizedModule):
        raise TypeError("this object is an optimized wrapper; compile its .original in place instead")
    if state_of(model) is not None:
        raise TypeError(f"this {type(model).__name__} is already compiled in place by longctx_compiler")
    if model.__dict__.get("_compiled_call_impl") is not None:
        raise TypeError(
            f"this {type(model).__name__} was already compiled with model.compile(); "
            "compiling it in place again would replace that compile. Use a model that was not compiled."
        )
    state = LongctxState(model, config)
    # Plain attributes (not parameters or submodules): nn.Module keeps them in __dict__.
    model.__dict__[ATTRIBUTE] = state
    model.__dict__["_compiled_call_impl"] = state
    return model


def unpatch(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`patch`: ``model(...)`` runs eagerly again. Returns the same object."""
    if state_of(model) is None:
        raise TypeError(f"this {type(model).__name__} is not compiled in place by longctx_compiler")
    del model.__dict__[ATTRIBUTE]
    model.__dict__.pop("_compiled_call_impl", None)
    return model
