"""The built-in pipeline: every pass, in the order it runs, in one place.

Two stages: the passes that *raise* known spellings into canonical ``longctx`` ops run first,
then the passes that *rewrite* canonical ops into memory-bounded implementations. Within the
rewrite stage the order matters where passes compete for the same nodes:

* attention before the block passes: a pipelined layer carries the chunked-attention op;
* the per-scan rewrite before the block passes, which carry the rewritten scan;
* ``packed_documents`` after the per-op passes (attention and convolution read the documents'
  ids where they build their ops; it gives them to the scans and checks that nothing else
  mixes documents) and before the block passes, which carry the ops into their bodies;
* ``adjoint_sharded_blocks`` and ``pipelined_layers`` before ``recompute_ssm_blocks``: a block
  run chunk by chunk needs no recompute region;
* the LM loss after the layers: it reads the head that the layers feed;
* ``tiled_tokenwise`` after the loss: it takes the token-wise modules nothing else took (the
  MLPs of layers not pipelined), never the LM head;
* ``sequence_parallel`` last: it proves the whole rewritten graph may run on a shard of the
  sequence (every attention already the chunked op) and adds the collectives.

(``checkpoint_regions`` is not a pass of this list: the runner inlines activation-checkpoint
regions before the first pass and outlines what is left after the last, see ``base.py``.)
Pass modules are imported on first use, so importing the package stays cheap and a pass module
can import the kernels it needs. User passes go in ``Config(extra_passes=...)``, after these.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from longctx_compiler.config import Config
    from longctx_compiler.passes.base import Pass

STAGES = ("raise", "rewrite")

#: (stage, "module:class") in pipeline order.
PIPELINE: tuple[tuple[str, str], ...] = (
    ("raise", "scan_to_selective_scan:ScanToSelectiveScanPass"),
    ("rewrite", "attention:ChunkedAttentionPass"),
    ("rewrite", "adjoint_sharded_scan:AdjointShardedScanPass"),
    ("rewrite", "ssd_scan:SSDScanPass"),
    ("rewrite", "depthwise_conv:DepthwiseConvPass"),
    ("rewrite", "packed_documents:PackedDocumentsPass"),
    ("rewrite", "adjoint_sharded_blocks:AdjointShardedBlocksPass"),
    ("rewrite", "pipelined_layers:PipelinedLayersPass"),
    ("rewrite", "recompute_ssm_blocks:RecomputeSSMBlocksPass"),
    ("rewrite", "tiled_lm_loss:TiledLMLossPass"),
    ("rewrite", "tiled_tokenwise:TiledTokenwisePass"),
    ("rewrite", "sequence_parallel:SequenceParallelPass"),
)


def pass_class(entry: str) -> type:
    """The class a ``"module:class"`` entry of :data:`PIPELINE` names."""
    module, name = entry.split(":")
    return getattr(importlib.import_module(f"longctx_compiler.passes.{module}"), name)


def builtin_passes() -> list["Pass"]:
    """Fresh instances of the built-in passes, in pipeline order."""
    return [pass_class(entry)() for _, entry in PIPELINE]


def pipeline(config: "Config") -> list["Pass"]:
    """The passes one compilation runs: built-ins, then the config's extra passes."""
    return builtin_passes() + list(config.extra_passes)
