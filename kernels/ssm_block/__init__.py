"""A block around one selective scan, run chunk by chunk along the sequence (forward and backward).

See ``chunked.py`` for the schedule and the math, ``op.py`` for the ``torch.library`` ops.
"""

from .chunked import BlockPlan, block_backward, block_forward, chunks, scan_in_window
from .op import get_plan, register_plan

__all__ = ["BlockPlan", "block_forward", "block_backward", "chunks", "scan_in_window", "register_plan", "get_plan"]
