"""Building blocks for people writing new long-context models.

* :func:`selective_scan_fn` — the selective scan as a model should call it: plain PyTorch
  (the sequential reference, ordinary autograd) in eager mode; under ``torch.compile`` it
  traces to **one** node, ``torch.ops.longctx.selective_scan_fwd.default`` with
  ``chunk_size=0`` ("reference semantics, chunk size not planned yet"), which the compiler's
  passes recognise and configure (see :mod:`longctx_compiler.nn.ssm`).
* :class:`SelectiveSSM` — a Mamba-style mixer layer computing in its own dtype.
* :class:`TinyMambaLM` — a small language model (embedding, residual RMSNorm→SelectiveSSM
  blocks, final norm, LM head) for examples and tests.
* :func:`selective_scan` — the configurable op itself (chunk size, exact/truncated), re-exported
  from ``longctx_compiler.kernels.selective_scan``.
"""

from longctx_compiler.kernels.selective_scan import selective_scan

from .ssm import CANONICAL_CHUNK, RMSNorm, SelectiveSSM, TinyLMOutput, TinyMambaLM, selective_scan_fn

__all__ = [
    "selective_scan",
    "selective_scan_fn",
    "CANONICAL_CHUNK",
    "RMSNorm",
    "SelectiveSSM",
    "TinyMambaLM",
    "TinyLMOutput",
]
