"""The ``torch.compile`` backend: our passes over the Dynamo graph, then Inductor or AOT-eager.

Dynamo hands the backend ``(gm, example_inputs)``: the captured graph in torch-level IR. We
rewrite it there (so AOTAutograd later saves exactly what our ops' backward formulas use) and
delegate the rest:

* ``"inductor"``: :func:`torch._inductor.compile_fx.compile_fx` (Triton on GPU, C++ on CPU);
* ``"aot_eager"``: the same AOTAutograd forward/backward split, run by the eager interpreter.

A pass that fails with an unexpected error falls back to the un-rewritten graph with a
:class:`PassFailureWarning` naming the pass; with ``strict=True`` a :class:`PassFailure`
naming it is raised.

What the console shows (nothing is printed):

* one :class:`RefusalWarning` per compiled graph that has refused sites, summarising them
  ("2 of 6 sites were not rewritten (chunked_attention ×2: <reason>); see model.report"),
  not one per site, and not again when Dynamo recompiles a graph with the same refusals;
* progress on the ``"longctx_compiler"`` logger at INFO: when a graph starts compiling and
  when it is done, with the duration and what was rewritten (the library only adds a
  ``NullHandler``: configure logging to see it).
"""

from __future__ import annotations

import copy
import logging
import os
import sys
import time
import warnings
from collections import Counter
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx

from longctx_compiler.config import Config
from longctx_compiler.passes.base import PassContext, PassError, run_passes
from longctx_compiler.passes.registry import pipeline
from longctx_compiler.report import GraphRecord, RewriteReport, snapshot

__all__ = ["LongctxBackend", "PassFailure", "PassFailureWarning", "RefusalWarning", "quiet_checkpoint_policy_warning"]

log = logging.getLogger("longctx_compiler")


class PassFailure(RuntimeError):
    """A pass failed unexpectedly (raised with ``strict=True``; a warning otherwise).

    Attributes:
        pass_name: the failing pass (None if the failure happened outside any pass).
        site: where it was working, or None.
    """

    def __init__(self, message: str, pass_name: str | None = None, site: str | None = None) -> None:
        super().__init__(message)
        self.pass_name = pass_name
        self.site = site


class RefusalWarning(UserWarning):
    """Some sites of a compiled graph were not rewritten; the report (``model.report``) says
    why. One warning per compiled graph, summarising its refusals."""


class PassFailureWarning(RuntimeWarning):
    """A pass failed and a graph was compiled without rewrites (``strict=False``)."""


class LongctxBackend:
    """A ``torch.compile`` backend object.

    Args:
        config: what to rewrite and how.
        report_sink: called with a fresh :class:`RewriteReport` whenever compilation of a new
            call starts (see :meth:`start_report`); graphs are appended to ``self.report``.
        compile: when False, return the rewritten graph's Python forward without AOTAutograd
            or code generation (what :func:`longctx_compiler.explain` uses).
    """

    def __init__(self, config: Config, *, compile: bool = True) -> None:
        self.config = config
        self.compile = compile
        self.report = RewriteReport()
        #: number of graphs this backend has compiled (Dynamo calls us once per graph)
        self.compile_count = 0
        # Refusal sets already warned about (see _warn_refusals).
        self._warned: set[tuple[tuple[str, str, str], ...]] = set()

    def start_report(self) -> RewriteReport:
        """Begin a new report: the graphs compiled from now on go into it."""
        self.report = RewriteReport()
        return self.report

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        self.compile_count += 1
        started = time.perf_counter()
        record = self.report.new_graph(gm)
        log.info("compiling graph %d (%d nodes, backend %s)", self.compile_count, len(gm.graph.nodes),
                 self.config.backend if self.compile else "none: explain")
        ctx = PassContext(self.config, tuple(example_inputs))
        # Rewrite a copy: if a pass breaks halfway, the original graph is still intact to
        # fall back to.
        work = _copy_graph_module(gm)
        try:
            try:
                passes = pipeline(self.config)
            except Exception as exc:
                # A pass module that fails to import: no pass to name, so name the stage.
                raise PassError("pass registry", None, exc) from exc
            run_passes(work, passes, ctx, record)
        except Exception as exc:  # noqa: BLE001 - any pass bug must not become a wrong result
            work = self._fall_back(gm, record, exc)
        record.after = snapshot(work)
        if self.compile:
            self._warn_refusals(record)
        try:
            compiled = self._delegate(work, example_inputs)
        except torch._dynamo.exc.RestartAnalysis:
            # Dynamo traces the frame again (e.g. a float read with .item() — Gemma's
            # embed_scale — is specialised, which AOT finds only now): this attempt is no
            # graph, and its rewrites will be reported by the one that follows.
            self.compile_count -= 1
            self.report.graphs.remove(record)
            log.info("graph %d: Dynamo restarts its analysis; compiling again", self.compile_count + 1)
            raise
        log.info("compiled graph %d in %.1f s: %s", self.compile_count, time.perf_counter() - started, _summary(record))
        return compiled

    def _fall_back(self, gm: fx.GraphModule, record: GraphRecord, exc: Exception) -> fx.GraphModule:
        """Raise :class:`PassFailure` (strict) or warn and compile ``gm`` unchanged."""
        name = exc.pass_name if isinstance(exc, PassError) else None
        site = exc.site if isinstance(exc, PassError) else None
        # PassError's message already names the pass and the site, with the error's first line.
        what = str(exc) if isinstance(exc, PassError) else f"{type(exc).__name__}: {exc}"
        if self.config.strict:
            raise PassFailure(f"longctx_compiler: {what} (strict=True)", name, site) from exc
        if self.config.distributed.active:
            # Each rank holds one shard of the sequence: the un-rewritten graph would compute
            # a wrong result on it, so there is nothing to fall back to.
            raise PassFailure(f"longctx_compiler: {what} (sequence parallelism cannot fall back)", name, site) from exc
        if self.config.packed_documents:
            # The un-rewritten graph runs the model's own math, which may mix the documents
            # the caller asked to keep apart.
            raise PassFailure(f"longctx_compiler: {what} (packed_documents cannot fall back)", name, site) from exc
        warnings.warn(
            f"longctx_compiler: {what}; compiling this graph without rewrites. Pass strict=True to raise instead.",
            PassFailureWarning,
            stacklevel=_user_stacklevel(),
        )
        # The warning is the user-facing message; the traceback is for whoever debugs the pass.
        log.debug("pass failure, falling back: %s", what, exc_info=exc)
        record.rewrites.clear()
        record.fallback_reason = what
        return gm

    def _warn_refusals(self, record: GraphRecord) -> None:
        """One :class:`RefusalWarning` summarising the graph's refusals, unless the same
        refusals were already reported (Dynamo recompiling a graph for new guards)."""
        if not record.refusals:
            return
        key = tuple((r.pass_name, r.site, r.reason) for r in record.refusals)
        if key in self._warned:
            return
        self._warned.add(key)
        total = len(record.refusals) + len(record.rewrites)
        groups = Counter((r.pass_name, r.reason) for r in record.refusals)
        why = "; ".join(f"{name} ×{n}: {reason}" for (name, reason), n in groups.items())
        warnings.warn(
            f"longctx_compiler: {len(record.refusals)} of {total} sites were not rewritten ({why}); see model.report",
            RefusalWarning,
            stacklevel=_user_stacklevel(),
        )

    def _delegate(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        if not self.compile:
            return gm.forward
        with quiet_checkpoint_policy_warning():
            if self.config.backend == "inductor":
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(gm, list(example_inputs))
            from torch._dynamo.backends.registry import lookup_backend

            return lookup_backend("aot_eager")(gm, list(example_inputs))


class quiet_checkpoint_policy_warning(logging.Filter):
    """Drops torch's "context_fn is passed to torch.utils.checkpoint" warning while we compile.

    The warning asks the author of a checkpoint region with a selective policy to make sure
    the region has no in-place ops. Our regions are built by
    :mod:`longctx_compiler.passes.recompute_ssm_blocks`, which refuses blocks with in-place
    ops, so the warning would only tell the user about a check we already made.
    """

    _logger = logging.getLogger("torch._higher_order_ops.wrap")

    def filter(self, record: logging.LogRecord) -> bool:
        return "context_fn is passed to torch.utils.checkpoint" not in record.getMessage()

    def __enter__(self) -> None:
        self._logger.addFilter(self)

    def __exit__(self, *exc: Any) -> None:
        self._logger.removeFilter(self)


def _internal_prefixes() -> tuple[str, ...]:
    # Our packages, torch, and the standard library's plumbing between them (contextlib,
    # functools): a warning is attributed to the first frame outside them, the user's line.
    import contextlib
    import functools

    dirs = []
    for name in ("longctx_compiler", "longctx_compiler.passes", "longctx_compiler.kernels", "torch"):
        mod = sys.modules.get(name)
        if mod is not None and getattr(mod, "__file__", None):
            dirs.append(os.path.dirname(os.path.abspath(mod.__file__)) + os.sep)
    files = [os.path.abspath(m.__file__) for m in (contextlib, functools)]
    return (*dirs, *files)


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning, issued by our caller, at the user's code
    (rather than at Dynamo's frame that called the backend)."""
    internal = _internal_prefixes()
    frame = sys._getframe(2)
    level = 2
    while frame is not None:
        name = frame.f_code.co_filename
        # "<...>": code Dynamo or FX generated
        if not name.startswith("<") and not os.path.abspath(name).startswith(internal):
            return level
        frame = frame.f_back
        level += 1
    return 2


def _summary(record: GraphRecord) -> str:
    """What happened to one graph, in one line (for the progress log)."""
    if record.fallback_reason:
        return f"no rewrites (fallback: {record.fallback_reason})"
    done = Counter(r.pass_name for r in record.rewrites)
    parts = [", ".join(f"{name} ×{n}" for name, n in done.items()) or "nothing rewritten"]
    if record.refusals:
        parts.append(f"{len(record.refusals)} refused (see the report)")
    return "; ".join(parts)


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph that shares gm's attributes (no tensor copies).

    Deep-copying the module would also copy any parameters or constants held as attributes,
    and the compiled graph would then train copies instead of the user's tensors.
    """
    # Graph.__deepcopy__ copies nodes (metadata shallow-copied), not the module's attributes.
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new
