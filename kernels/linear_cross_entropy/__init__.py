"""Sequence-tiled LM head + cross-entropy: reference, tiled torch implementation, op.

Layout: ``h [N, H]``, ``weight [V, H]``, ``bias [V]``, ``labels [N]`` int64. See README.md.
"""

from .chunked import linear_cross_entropy_backward, linear_cross_entropy_forward
from .op import linear_cross_entropy
from .reference import linear_cross_entropy_reference

__all__ = [
    "linear_cross_entropy_reference",
    "linear_cross_entropy",
    "linear_cross_entropy_forward",
    "linear_cross_entropy_backward",
]
