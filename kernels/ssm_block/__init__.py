"""The sequence-block runtime under its first name (blocks around a scan).

It now serves every kind of sequence block, with both carries: see
:mod:`longctx_compiler.kernels.sequence_block`. This module re-exports it.
"""

from longctx_compiler.kernels.sequence_block import (  # noqa: F401
    BLOCK_OP, BlockPlan, block_backward, block_forward, chunks, get_plan, register_plan, scan_in_window,
)
from longctx_compiler.kernels.sequence_block import chunked, op  # noqa: F401

__all__ = ["BlockPlan", "block_forward", "block_backward", "chunks", "scan_in_window", "register_plan", "get_plan", "BLOCK_OP"]
