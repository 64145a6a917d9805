"""``torch.library`` registration of the SSD scan: ``longctx::ssd_fwd`` / ``longctx::ssd_bwd``.

Schemas::

    longctx::ssd_fwd(Tensor x, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z,
        Tensor? dt_bias, bool dt_softplus, float dt_min, float dt_max, Tensor? initial_states,
        Tensor? seq_idx, int chunk_size) -> (Tensor out, Tensor final_states, Tensor boundary_states)

    longctx::ssd_bwd(<the forward's inputs>, Tensor boundary_states, Tensor dout,
        Tensor? dfinal) -> (Tensor dx, Tensor ddt, Tensor dA, Tensor dB, Tensor dC, Tensor dD,
                            Tensor dz, Tensor ddt_bias, Tensor dinitial_states)

``dt_min, dt_max`` are the clamp of Δ, ``(-inf, inf)`` for none. ``chunk_size = 0`` is the
canonical "not planned yet" value; it runs with :data:`DEFAULT_CHUNK`. The forward's inputs
and the ``[B, H, M·P·N]`` chunk-end states are all that the registered autograd formula
reads, so they are all AOTAutograd saves: O(T/Q · B·H·P·N) beyond the inputs. The states
travel flattened over (chunk, headdim, state): a separate length-``M`` dim would be 1 for
every ``T ≤ Q``, and the compiler specialises on a size-1 dim (a second graph for short
sequences). Gradients of omitted optional inputs come back from the bwd op as zeros (a
custom op returns a fixed list of tensors) and are dropped by the autograd formula.

Device branch inside the op bodies: CPU tensors run the chunked torch implementation, CUDA
tensors the Triton kernels (``triton.py``), imported only then.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from longctx_compiler.runtime.autocast import register_autocast

from ._args import DEFAULT_CHUNK, compute_dtype
from .chunked import ssd_chunked_bwd, ssd_chunked_fwd

__all__ = ["DEFAULT_CHUNK", "ssd_fwd", "ssd_bwd"]


def _chunk(chunk_size: int) -> int:
    return DEFAULT_CHUNK if chunk_size == 0 else chunk_size


def _impl(device: torch.device):
    if device.type == "cuda":
        from . import triton as triton_impl

        return triton_impl.ssd_triton_fwd, triton_impl.ssd_triton_bwd
    return ssd_chunked_fwd, ssd_chunked_bwd


def _limit(dt_min: float, dt_max: float):
    return None if dt_min == float("-inf") and dt_max == float("inf") else (dt_min, dt_max)


@torch.library.custom_op("longctx::ssd_fwd", mutates_args=())
def ssd_fwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    dt_bias: Optional[Tensor],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Optional[Tensor],
    seq_idx: Optional[Tensor],
    chunk_size: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward: ``(out [B, T, H, P], final_states [B, H, P, N], boundary_states [B, H, M·P·N])``."""
    fwd, _ = _impl(x.device)
    out, final, boundary = fwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, _limit(dt_min, dt_max), initial_states, seq_idx,
                               chunk_size=_chunk(chunk_size))
    # Fresh contiguous outputs: what the fake kernel promises.
    return out.contiguous(), final.contiguous(), boundary.reshape(boundary.shape[0], boundary.shape[1], -1).contiguous()


@ssd_fwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx, chunk_size):
    bsz, seqlen, heads, headdim = x.shape
    dstate = B.shape[-1]
    q = _chunk(chunk_size)
    # Shape arithmetic only, so a symbolic T stays symbolic: M = ceil(T / Q).
    nchunks = (seqlen + q - 1) // q
    cdt = compute_dtype(x, A, D, dt_bias, initial_states)
    out = x.new_empty(x.shape)
    final = x.new_empty((bsz, heads, headdim, dstate), dtype=cdt)
    boundary = x.new_empty((bsz, heads, nchunks * headdim * dstate), dtype=cdt)
    return out, final, boundary


@torch.library.custom_op("longctx::ssd_bwd", mutates_args=())
def ssd_bwd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    dt_bias: Optional[Tensor],
    dt_softplus: bool,
    dt_min: float,
    dt_max: float,
    initial_states: Optional[Tensor],
    seq_idx: Optional[Tensor],
    chunk_size: int,
    boundary_states: Tensor,
    dout: Tensor,
    dfinal: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Backward: ``(dx, ddt, dA, dB, dC, dD, dz, ddt_bias, dinitial_states)``, zeros for omitted inputs."""
    _, bwd = _impl(x.device)
    bsz, _, heads, headdim = x.shape
    dstate = B.shape[-1]
    # [B, H, M·P·N] as the forward op returned it -> [B, H, M, P, N] for the implementations.
    boundary_states = boundary_states.view(bsz, heads, -1, headdim, dstate)
    grads = bwd(x, dt, A, B, C, D, z, dt_bias, dt_softplus, _limit(dt_min, dt_max), initial_states, seq_idx,
                boundary_states=boundary_states, dout=dout, dfinal=dfinal, chunk_size=_chunk(chunk_size))
    dx, ddt, dA, dB, dC, dD, dz, ddb, dh0 = grads
    if dD is None:
        dD = x.new_zeros((heads,))
    if dz is None:
        dz = torch.zeros_like(x)
    if ddb is None:
        ddb = x.new_zeros((heads,))
    if dh0 is None:
        dh0 = x.new_zeros((bsz, heads, headdim, dstate))
    return tuple(t.contiguous() for t in (dx, ddt, dA, dB, dC, dD, dz, ddb, dh0))


@ssd_bwd.register_fake
def _(x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx, chunk_size, boundary_states, dout, dfinal):
    bsz, _, heads, headdim = x.shape
    dstate = B.shape[-1]

    def like(t, shape):
        # Contiguous, in the input's dtype (x's for an omitted one): what the real op returns.
        return x.new_empty(tuple(t.shape) if t is not None else shape, dtype=x.dtype if t is None else t.dtype)

    return (
        like(x, None), like(dt, None), like(A, None), like(B, None), like(C, None),
        like(D, (heads,)), like(z, tuple(x.shape)), like(dt_bias, (heads,)),
        like(initial_states, (bsz, heads, headdim, dstate)),
    )


def _setup_context(ctx, inputs, output):
    x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx, chunk_size = inputs
    _, _, boundary = output
    # Exactly the inputs and the M·B·H·P·N chunk-end states: this is the whole saved set.
    ctx.save_for_backward(x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, boundary)
    ctx.config = (dt_softplus, dt_min, dt_max, chunk_size)
    ctx.mark_non_differentiable(boundary)


def _backward(ctx, dout, dfinal, _dboundary):
    x, dt, A, B, C, D, z, dt_bias, initial_states, seq_idx, boundary = ctx.saved_tensors
    dt_softplus, dt_min, dt_max, chunk_size = ctx.config
    dx, ddt, dA, dB, dC, dD, dz, ddb, dh0 = torch.ops.longctx.ssd_bwd(
        x, dt, A, B, C, D, z, dt_bias, dt_softplus, dt_min, dt_max, initial_states, seq_idx, chunk_size,
        boundary, dout, dfinal,
    )
    return (
        dx, ddt, dA, dB, dC,
        None if D is None else dD,
        None if z is None else dz,
        None if dt_bias is None else ddb,
        None, None, None,
        None if initial_states is None else dh0,
        None, None,
    )


ssd_fwd.register_autograd(_backward, setup_context=_setup_context)


# -- autocast ----------------------------------------------------------------------------------
# As the selective scan: the scan computes in the promotion of its inputs' dtypes and at least
# float32, which is what the reference does under torch.autocast (its ops are on no
# lower-precision list). So under autocast the ops take their inputs as they come and run with
# autocast off: 16-bit activations are computed in float32 and the output keeps their dtype.
_lib = torch.library.Library("longctx", "FRAGMENT")  # noqa: TOR901 - kept alive with the module
register_autocast(_lib, "ssd_fwd", torch.ops.longctx.ssd_fwd.default)
register_autocast(_lib, "ssd_bwd", torch.ops.longctx.ssd_bwd.default)
