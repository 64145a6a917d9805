"""longctx_compiler: compiler passes over torch.fx for long-context training.

``optimize(model)`` captures a model with ``torch.compile``, rewrites the parts whose memory
grows with the sequence length (attention, SSM scans) into exact, memory-bounded forms, and
hands the rest to TorchInductor. ``explain`` shows what would be rewritten; ``viz`` draws it.
"""

import logging as _logging

from longctx_compiler.api import BypassWarning, OptimizedFunction, OptimizedModule, explain, optimize
from longctx_compiler.backend import PassFailure, PassFailureWarning, RefusalWarning
from longctx_compiler.config import AttentionConfig, Config, DistributedConfig, LayerConfig, LMLossConfig, SSMConfig
from longctx_compiler.report import Refusal, Rewrite, RewriteReport

# ``lc.viz.render(report, ...)`` works after ``import longctx_compiler as lc``: the drawing
# module is part of the public surface (it imports graphviz's Python package only).
from longctx_compiler import viz  # noqa: E402
# ``optimize(model, inplace=True)`` and ``lc.integrations.unpatch(model)``: the training-library
# integration point.
from longctx_compiler import integrations  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "optimize",
    "explain",
    "Config",
    "AttentionConfig",
    "SSMConfig",
    "LMLossConfig",
    "LayerConfig",
    "DistributedConfig",
    "RewriteReport",
    "Rewrite",
    "Refusal",
    "OptimizedModule",
    "OptimizedFunction",
    "BypassWarning",
    "RefusalWarning",
    "PassFailure",
    "PassFailureWarning",
    "viz",
    "integrations",
    "__version__",
]

# Library logging: silent unless the application configures it.
_logging.getLogger("longctx_compiler").addHandler(_logging.NullHandler())
