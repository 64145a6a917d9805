"""Graph passes (installed as ``longctx_compiler.passes``): one file per pass.

``registry.PIPELINE`` lists the built-in passes in the order they run: first the passes that
*raise* known spellings into canonical ``longctx`` ops, then the passes that *rewrite* canonical
ops into memory-bounded implementations. What the passes share to prove a rewrite exact lives
in ``analysis/``. User passes go in ``Config(extra_passes=...)``.
"""

from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext, run_passes
from longctx_compiler.passes.registry import PIPELINE, builtin_passes, pipeline

__all__ = ["CantApply", "Match", "Pass", "PassContext", "run_passes", "PIPELINE", "builtin_passes", "pipeline"]
