"""``torch.library`` registration of the selective scan: ``longctx::selective_scan_fwd/_bwd``.

Schemas::

    longctx::selective_scan_fwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C,
        Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? h0,
        int chunk_size, str mode, int window, Tensor? seq_idx=None)
        -> (Tensor y, Tensor final_state, Tensor boundary_states)

    longctx::selective_scan_bwd(Tensor u, Tensor delta, Tensor A, Tensor B, Tensor C,
        Tensor? D, Tensor? z, Tensor? delta_bias, bool delta_softplus, Tensor? h0,
        Tensor boundary_states, Tensor dy, Tensor? dfinal, int chunk_size, str mode,
        int window, Tensor? seq_idx=None) -> (Tensor du, Tensor ddelta, Tensor dA, Tensor dB, Tensor dC,
                        Tensor dD, Tensor dz, Tensor ddelta_bias, Tensor dh0)

``chunk_size = 0`` is the canonical "not planned yet" value (what
``longctx_compiler.nn.selective_scan_fn`` puts in a captured graph); it runs with
:data:`DEFAULT_CHUNK`. ``mode`` is ``"exact"`` or ``"truncated"``; ``window`` is the
truncation window T̄ (ignored, conventionally 0, in exact mode). ``seq_idx`` (``[B, T]``
int32/int64, optional) marks packed documents: the state resets where it changes (the step's
decay is multiplied by 0 there, in the forward and in the backward alike). It comes last, after
the plan's arguments, so that calls written without it keep their positions. The forward's inputs and the
``[B, D, M·N]`` boundary states (M·N flattened, see ``selective_scan_fwd``) are all that the registered autograd formula reads, so they
are all AOTAutograd saves. ``boundary_states`` and ``seq_idx`` are not differentiable. Gradients of omitted
optional inputs come back from the bwd op as zeros (a custom op returns a fixed list of
tensors) and are dropped by the autograd formula.

Device branch inside the op bodies: CPU tensors run the chunked torch implementation,
CUDA tensors the Triton kernels (``triton.py``), imported only then.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from longctx_compiler.runtime.autocast import register_autocast

from ._args import compute_dtype
from .chunked import selective_scan_chunked_bwd, selective_scan_chunked_fwd
from .schema import UNPLANNED, ScanArgs

__all__ = ["DEFAULT_CHUNK", "selective_scan_fwd", "selective_scan_bwd"]

#: Chunk length used when the graph carries the "not planned" value ``chunk_size = 0``.
DEFAULT_CHUNK = 256


def _chunk(chunk_size: int) -> int:
    return DEFAULT_CHUNK if chunk_size == UNPLANNED else chunk_size


def _impl(device: torch.device):
    if device.type == "cuda":
        from . import triton as triton_impl

        return triton_impl.selective_scan_triton_fwd, triton_impl.selective_scan_triton_bwd
    return selective_scan_chunked_fwd, selective_scan_chunked_bwd


@torch.library.custom_op("longctx::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    h0: Optional[Tensor],
    chunk_size: int,
    mode: str,
    window: int,
    seq_idx: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: ``(y [B, D, T], final_state [B, D, N], boundary_states [B, D, M·N])``.

    The boundary states travel flattened over (chunk, state): a separate length-``M`` dim
    would be 1 for every ``T <= Q``, and shape checks on a size-1 dim make the compiler
    specialise on it (a second graph for short sequences). ``M·N`` is never 1 for ``N > 1``.
    """
    fwd, _ = _impl(u.device)
    y, final, boundary = fwd(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk_size=_chunk(chunk_size), seq_idx=seq_idx)
    # Fresh contiguous outputs: what the fake kernel promises.
    return y.contiguous(), final.contiguous(), boundary.reshape(boundary.shape[0], boundary.shape[1], -1).contiguous()


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, chunk_size, mode, window, seq_idx=None):
    bsz, dim, seqlen = u.shape
    dstate = A.shape[1]
    q = _chunk(chunk_size)
    # Shape arithmetic only, so a symbolic T stays symbolic: M = ceil(T / Q).
    nchunks = (seqlen + q - 1) // q
    cdt = compute_dtype(u, A, D, delta_bias, h0)
    if seq_idx is not None:
        # The document index runs along u's sequence: checking it here makes a traced graph's
        # two sequence lengths one symbol (what the block runtime's window analysis needs to
        # narrow seq_idx with the other sequence inputs).
        torch._check(seq_idx.shape[0] == bsz, lambda: f"selective_scan: seq_idx must be [batch={bsz}, seqlen], got {tuple(seq_idx.shape)}")
        torch._check(seq_idx.shape[-1] == seqlen, lambda: f"selective_scan: seq_idx must be [batch, seqlen={seqlen}], got {tuple(seq_idx.shape)}")
    y = u.new_empty(u.shape)
    final = u.new_empty((bsz, dim, dstate), dtype=cdt)
    boundary = u.new_empty((bsz, dim, nchunks * dstate), dtype=cdt)
    return y, final, boundary


@torch.library.custom_op("longctx::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    h0: Optional[Tensor],
    boundary_states: Tensor,
    dy: Tensor,
    dfinal: Optional[Tensor],
    chunk_size: int,
    mode: str,
    window: int,
    seq_idx: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0)``, zeros for omitted inputs."""
    _, bwd = _impl(u.device)
    # [B, D, M·N] as the forward op returned it -> [B, D, M, N] for the kernels.
    boundary_states = boundary_states.view(boundary_states.shape[0], boundary_states.shape[1], -1, A.shape[1])
    grads = bwd(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, boundary_states, dy, dfinal,
        chunk_size=_chunk(chunk_size), mode=mode, window=window if mode == "truncated" else None, seq_idx=seq_idx,
    )
    du, ddelta, dA, dB, dC, dD, dz, ddb, dh0 = grads
    bsz, dim, _ = u.shape
    dstate = A.shape[1]
    if dD is None:
        dD = u.new_zeros((dim,))
    if dz is None:
        dz = torch.zeros_like(u)
    if ddb is None:
        ddb = u.new_zeros((dim,))
    if dh0 is None:
        dh0 = u.new_zeros((bsz, dim, dstate))
    return tuple(t.contiguous() for t in (du, ddelta, dA, dB, dC, dD, dz, ddb, dh0))


@selective_scan_bwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, boundary_states, dy, dfinal, chunk_size, mode, window, seq_idx=None):
    bsz, dim, _ = u.shape
    dstate = A.shape[1]

    def like(t, shape=None):
        # Contiguous, in the input's dtype: what the real op returns.
        return u.new_empty(tuple(t.shape) if shape is None else shape, dtype=u.dtype if t is None else t.dtype)

    return (
        like(u), like(delta), like(A), like(B), like(C),
        like(D, None if D is not None else (dim,)),
        like(z, None if z is not None else tuple(u.shape)),
        like(delta_bias, None if delta_bias is not None else (dim,)),
        like(h0, None if h0 is not None else (bsz, dim, dstate)),
    )


def _setup_context(ctx, inputs, output):
    a = ScanArgs(*inputs)
    _, _, boundary = output
    # Exactly the inputs and the M·D·N boundary states: this is the whole saved set.
    ctx.save_for_backward(a.u, a.delta, a.A, a.B, a.C, a.D, a.z, a.delta_bias, a.h0, a.seq_idx, boundary)
    ctx.delta_softplus = a.delta_softplus
    ctx.chunk_size = a.chunk_size
    ctx.mode = a.mode
    ctx.window = a.window
    ctx.mark_non_differentiable(boundary)


def _backward(ctx, dy, dfinal, _dboundary):
    u, delta, A, B, C, D, z, delta_bias, h0, seq_idx, boundary = ctx.saved_tensors
    du, ddelta, dA, dB, dC, dD, dz, ddb, dh0 = torch.ops.longctx.selective_scan_bwd(
        u, delta, A, B, C, D, z, delta_bias, ctx.delta_softplus, h0, boundary,
        dy, dfinal, ctx.chunk_size, ctx.mode, ctx.window, seq_idx,
    )
    return (
        du, ddelta, dA, dB, dC,
        None if D is None else dD,
        None if z is None else dz,
        None if delta_bias is None else ddb,
        None,
        None if h0 is None else dh0,
        None, None, None,
        None,  # seq_idx: an integer index, not differentiable
    )


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)

# The schema module names the arguments in this order; passes rely on it.
assert tuple(a.name for a in torch.ops.longctx.selective_scan_fwd.default._schema.arguments) == ScanArgs._fields


# -- autocast ----------------------------------------------------------------------------------
# The scan computes in the promotion of its inputs' dtypes and at least float32 (mamba's rule),
# which is also what the reference does under ``torch.autocast``: its ops (exp, softplus, sums)
# are on no lower-precision list, and float32/float64 operands are left as they are. So under
# autocast the ops take their inputs as they come and run with autocast off: nothing inside
# (the CPU path's torch ops, the CUDA path's torch glue around the Triton kernels) is recast by
# the ambient autocast state. A model that feeds the scan autocast's bfloat16 activations gets
# its float32 compute and the output in the activations' dtype, as in eager.
_lib = torch.library.Library("longctx", "FRAGMENT")  # noqa: TOR901 - kept alive with the module
register_autocast(_lib, "selective_scan_fwd", torch.ops.longctx.selective_scan_fwd.default)
register_autocast(_lib, "selective_scan_bwd", torch.ops.longctx.selective_scan_bwd.default)
