"""Graph passes (installed as ``longctx_compiler.passes``): one file per pass.

The registry keeps built-in passes in pipeline order: first the passes that *raise* known
spellings into canonical ``longctx`` ops, then the passes that *rewrite* canonical ops into
memory-bounded implementations. User passes go in ``Config(extra_passes=...)``.
"""

from longctx_compiler.passes.base import CantApply, Match, Pass, PassContext, run_passes
from longctx_compiler.passes.registry import builtin_passes, pipeline, register_pass

__all__ = ["CantApply", "Match", "Pass", "PassContext", "run_passes", "builtin_passes", "pipeline", "register_pass"]
