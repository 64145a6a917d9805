"""The ``torch.compile`` backend: our passes over the Dynamo graph, then Inductor or AOT-eager.

Dynamo hands the backend ``(gm, example_inputs)``: the captured graph in torch-level IR. We
rewrite it there (so AOTAutograd later saves exactly what our ops' backward formulas use) and
delegate the rest:

* ``"inductor"``: :func:`torch._inductor.compile_fx.compile_fx` (Triton on GPU, C++ on CPU);
* ``"aot_eager"``: the same AOTAutograd forward/backward split, run by the eager interpreter.

A pass that fails with an unexpected error falls back to the un-rewritten graph with a
warning; with ``strict=True`` the error is raised.
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any, Callable, Sequence

import torch.fx as fx

from longctx_compiler.config import Config
from longctx_compiler.passes.base import PassContext, run_passes
from longctx_compiler.passes.registry import pipeline
from longctx_compiler.report import RewriteReport, snapshot

__all__ = ["LongctxBackend", "PassFailure", "quiet_checkpoint_policy_warning"]

log = logging.getLogger("longctx_compiler")


class PassFailure(RuntimeError):
    """A pass failed unexpectedly (raised with ``strict=True``; a warning otherwise)."""


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

    def start_report(self) -> RewriteReport:
        """Begin a new report: the graphs compiled from now on go into it."""
        self.report = RewriteReport()
        return self.report

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        self.compile_count += 1
        record = self.report.new_graph(gm)
        ctx = PassContext(self.config, tuple(example_inputs))
        # Rewrite a copy: if a pass breaks halfway, the original graph is still intact to
        # fall back to.
        work = _copy_graph_module(gm)
        try:
            run_passes(work, pipeline(self.config), ctx, record)
        except Exception as exc:  # noqa: BLE001 - any pass bug must not become a wrong result
            if self.config.strict:
                raise PassFailure(f"a longctx_compiler pass failed (strict=True): {type(exc).__name__}: {exc}") from exc
            reason = f"{type(exc).__name__}: {exc}"
            warnings.warn(
                f"longctx_compiler: a pass failed, compiling this graph without rewrites ({reason}). "
                "Pass strict=True to raise instead.",
                RuntimeWarning,
                stacklevel=2,
            )
            log.warning("pass failure, falling back: %s", reason, exc_info=True)
            record.rewrites.clear()
            record.fallback_reason = reason
            work = gm
        record.after = snapshot(work)
        return self._delegate(work, example_inputs)

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


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A new GraphModule with a copied graph that shares gm's attributes (no tensor copies).

    Deep-copying the module would also copy any parameters or constants held as attributes,
    and the compiled graph would then train copies instead of the user's tensors.
    """
    # Graph.__deepcopy__ copies nodes (metadata shallow-copied), not the module's attributes.
    new = fx.GraphModule(gm, copy.deepcopy(gm.graph))
    new.meta = dict(getattr(gm, "meta", {}))
    return new
