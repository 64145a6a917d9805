"""A sequence block (a Mamba block, a Transformer decoder layer, a hybrid layer) run chunk by
chunk along the sequence, forward and backward, with its carries: scan states (selective and
SSD scans) and K/V histories.

See ``chunked.py`` for the schedule, ``carry.py`` for the carries, ``op.py`` for the
``torch.library`` ops, ``README.md`` for the math.
"""

from .carry import Carry, KVHistory, attention_in_window, scan_in_window, ssd_in_window
from .chunked import BlockPlan, autograd_inside_op, block_backward, block_forward, chunks
from .op import BLOCK_OP, get_plan, register_plan

__all__ = [
    "BlockPlan", "Carry", "KVHistory", "block_forward", "block_backward", "chunks", "scan_in_window", "ssd_in_window",
    "attention_in_window", "autograd_inside_op", "register_plan", "get_plan", "BLOCK_OP",
]
