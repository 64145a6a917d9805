"""Building blocks for people writing new long-context models.

* :func:`selective_scan_fn` — the selective scan as a model should call it: plain PyTorch
  (the sequential reference, ordinary autograd) in eager mode; under ``torch.compile`` it
  traces to **one** node, ``torch.ops.longctx.selective_scan_fwd.default`` with
  ``chunk_size=0`` ("reference semantics, chunk size not planned yet"), which the compiler's
  passes recognise and configure (see :mod:`longctx_compiler.nn.ssm`).
* :class:`SelectiveSSM` — a Mamba-style mixer layer computing in its own dtype.
* :class:`TinyMambaLM` — a small language model (embedding, residual RMSNorm→SelectiveSSM
  blocks, final norm, LM head) for examples and tests.
* :class:`Mamba2Mixer` — a Mamba-2 layer (in_proj → z, xBC, Δ; causal conv; SSD scan via
  :func:`ssd_scan`; gated RMSNorm :class:`GatedRMSNorm`; out_proj), and
  :class:`TinyMamba2LM`, the small language model with Mamba-2 layers.
* :func:`selective_scan`, :func:`ssd_scan` — the configurable ops themselves, re-exported
  from ``longctx_compiler.kernels.selective_scan`` and ``longctx_compiler.kernels.ssd``.
"""

from longctx_compiler.kernels.selective_scan import selective_scan
from longctx_compiler.kernels.ssd import ssd_scan

from .mamba2 import GatedRMSNorm, Mamba2Mixer, TinyMamba2LM
from .ssm import CANONICAL_CHUNK, RMSNorm, SelectiveSSM, TinyLMOutput, TinyMambaLM, selective_scan_fn

__all__ = [
    "selective_scan",
    "selective_scan_fn",
    "ssd_scan",
    "CANONICAL_CHUNK",
    "RMSNorm",
    "SelectiveSSM",
    "TinyMambaLM",
    "TinyLMOutput",
    "GatedRMSNorm",
    "Mamba2Mixer",
    "TinyMamba2LM",
]
