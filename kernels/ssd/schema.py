"""The arguments and results of ``longctx::ssd_fwd``, named once.

Every pass and runtime that reads, writes or rebuilds a call of the op goes through
:class:`SSDArgs` instead of argument positions (as :mod:`..selective_scan.schema` does for
the selective scan)::

    args = SSDArgs.of(node)
    node.args = tuple(args._replace(initial_states=h))

The field order is the op's schema (``op.py``; a test checks they agree). Layout as in
``_args.py``: ``x, z: [B, T, H, P]``, ``dt: [B, T, H]``, ``A, dt_bias: [H]``,
``B, C: [B, T, G, N]``, ``D: [H] | [H, P]``, ``initial_states: [B, H, P, N]``,
``seq_idx: [B, T]``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

__all__ = ["SSDArgs", "UNPLANNED", "SEQUENCE_DIMS", "OUT", "FINAL_STATES", "BOUNDARY_STATES"]

#: ``chunk_size`` of a call no pass has planned (the op runs it with ``DEFAULT_CHUNK``).
UNPLANNED = 0


class SSDArgs(NamedTuple):
    """One call's arguments, in the op's order. The defaults: no skip, gate, bias, softplus,
    clamp (``dt_min, dt_max = -inf, inf``), initial state or documents; unplanned chunk."""

    x: Any
    dt: Any
    A: Any
    B: Any
    C: Any
    D: Any = None
    z: Any = None
    dt_bias: Any = None
    dt_softplus: bool = False
    dt_min: float = -math.inf
    dt_max: float = math.inf
    initial_states: Any = None
    seq_idx: Any = None
    chunk_size: int = UNPLANNED

    @classmethod
    def of(cls, node: Any) -> "SSDArgs":
        """The arguments of an ``fx.Node`` calling the op, whether passed by position or keyword."""
        return cls(*node.args, **node.kwargs)


#: The arguments that run along the sequence, and the dim the op reads it along.
SEQUENCE_DIMS = {"x": 1, "dt": 1, "B": 1, "C": 1, "z": 1, "seq_idx": 1}

#: The op's results: ``out [B, T, H, P]``, ``final_states [B, H, P, N]``,
#: ``boundary_states [B, H, M·P·N]``.
OUT, FINAL_STATES, BOUNDARY_STATES = range(3)
