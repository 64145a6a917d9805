"""The arguments and results of ``longctx::selective_scan_fwd``, named once.

Every pass and runtime that reads, writes or rebuilds a call of the op goes through
:class:`ScanArgs` instead of argument positions::

    args = ScanArgs.of(node)                        # a captured call, positional or keyword
    args.h0, args.mode                              # read by name
    node.args = tuple(args._replace(h0=h))          # rewrite by name
    torch.ops.longctx.selective_scan_fwd(*ScanArgs(u, delta, A, B, C, D, z))   # unplanned call

The field order is the op's schema (``op.py`` checks it at import). Layout as in ``_args.py``:
``u, delta, z: [B, D, T]``, ``A: [D, N]``, ``B, C: [B, N, T] | [B, G, N, T]``,
``D, delta_bias: [D]``, ``h0: [B, D, N]``, ``seq_idx: [B, T]`` (int32/int64 document index).
"""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["ScanArgs", "UNPLANNED", "SEQUENCE_DIMS", "Y", "FINAL_STATE", "BOUNDARY_STATES"]

#: ``chunk_size`` of a call no pass has planned yet (the op runs it with ``DEFAULT_CHUNK``).
UNPLANNED = 0


class ScanArgs(NamedTuple):
    """One call's arguments, in the op's order. The defaults make a canonical, unplanned,
    exact call: no skip, gate, bias, softplus, initial state or documents. ``seq_idx`` is last
    (after the plan's fields) so that calls written before it existed keep their positions."""

    u: Any
    delta: Any
    A: Any
    B: Any
    C: Any
    D: Any = None
    z: Any = None
    delta_bias: Any = None
    delta_softplus: bool = False
    h0: Any = None
    chunk_size: int = UNPLANNED
    mode: str = "exact"
    window: int = 0
    seq_idx: Any = None

    @classmethod
    def of(cls, node: Any) -> "ScanArgs":
        """The arguments of an ``fx.Node`` calling the op, whether passed by position or keyword."""
        return cls(*node.args, **node.kwargs)


#: The arguments that run along the sequence, and the dim the op reads it along.
SEQUENCE_DIMS = {"u": -1, "delta": -1, "B": -1, "C": -1, "z": -1, "seq_idx": -1}

#: The op's results: ``y [B, D, T]``, ``final_state [B, D, N]``, ``boundary_states [B, D, M·N]``.
Y, FINAL_STATE, BOUNDARY_STATES = range(3)
