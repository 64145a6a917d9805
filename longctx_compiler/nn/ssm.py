"""Mamba-style layers whose selective scan the compiler captures as one canonical node.

The canonical-op mechanism
--------------------------
:func:`selective_scan_fn` branches on :func:`torch.compiler.is_compiling`:

* **eager** — it runs :func:`selective_scan_reference` (a sequential loop with ordinary
  autograd). Eager behaviour is exactly plain PyTorch; nothing of ours sits between the
  user and autograd.
* **under torch.compile** — Dynamo constant-folds ``is_compiling()`` to True and traces a
  call to the custom op ``torch.ops.longctx.selective_scan_fwd.default`` with
  ``chunk_size = 0`` (the canonical "not planned" value), ``mode = "exact"``,
  ``window = 0``, followed by ``operator.getitem`` on output 0 (and 1 with
  ``return_final_state``). A rewrite pass finds the node by its target, and plans it by
  setting its ``chunk_size`` (and, only on request, ``mode``/``window``) arguments. Left
  unplanned, the op still runs, exactly, with ``DEFAULT_CHUNK``.

So one node stands for the whole scan (no unrolling over T in the graph), with reference
semantics in eager and the same semantics (exact up to round-off) when compiled.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx_compiler.kernels.selective_scan import selective_scan_reference

# Importing the op module registers torch.ops.longctx.selective_scan_fwd/_bwd.
from longctx_compiler.kernels.selective_scan import op as _op  # noqa: F401
from longctx_compiler.kernels.selective_scan.schema import UNPLANNED, ScanArgs

__all__ = ["CANONICAL_CHUNK", "selective_scan_fn", "RMSNorm", "SelectiveSSM", "TinyMambaLM", "TinyLMOutput"]

#: ``chunk_size`` value of the canonical, not-yet-planned selective-scan node.
CANONICAL_CHUNK = UNPLANNED


def selective_scan_fn(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    h0: torch.Tensor | None = None,
    return_final_state: bool = False,
    *,
    seq_idx: torch.Tensor | None = None,
):
    """Selective scan with reference semantics; one canonical op node under torch.compile.

    Arguments, shapes and returns as
    :func:`longctx_compiler.kernels.selective_scan.selective_scan_reference`; ``seq_idx``
    (``[B, T]`` int32/int64, keyword only: mamba_ssm's function has no such argument) marks
    packed documents, the state resetting where it changes.
    """
    if torch.compiler.is_compiling():
        y, final, _ = torch.ops.longctx.selective_scan_fwd.default(
            *ScanArgs(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, seq_idx=seq_idx))
        return (y, final) if return_final_state else y
    return selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, h0, return_final_state, seq_idx)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension, computed in the input's dtype (no float32 upcast),
    so a float64 model stays float64 end to end."""

    def __init__(self, dim: int, eps: float = 1e-6, *, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SelectiveSSM(nn.Module):
    """Mamba (v1) mixer: in_proj → causal depthwise conv1d → x_proj → dt_proj → selective
    scan → gate → out_proj.

    Input and output ``[batch, T, d_model]``. Every operation runs in the module's dtype
    (the scan itself uses float32 internally for 16-bit inputs, like mamba).

    Args:
        d_model: model width.
        d_state: N, the SSM state size per channel.
        d_conv: causal convolution width.
        expand: inner width ``d_inner = expand · d_model`` (the scan's D channels).
        dt_rank: rank of the Δ projection (``"auto"``: ``ceil(d_model / 16)``).
        dt_min, dt_max: range of the initial step sizes (mamba's initialisation).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if d_model < 1 or d_state < 1 or d_conv < 1 or expand < 1:
            raise ValueError("SelectiveSSM: d_model, d_state, d_conv and expand must be positive")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False, **kw)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1, **kw)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **kw)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **kw)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **kw)
        # S4D-real initialisation: A = -(1..N) per channel, stored as a log for positivity.
        A = torch.arange(1, d_state + 1, dtype=torch.float64).repeat(self.d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A).to(device=device, dtype=dtype or torch.get_default_dtype()))
        self.D = nn.Parameter(torch.ones(self.d_inner, **kw))
        # Δ bias so that softplus(bias) is log-uniform in [dt_min, dt_max] (mamba's init).
        with torch.no_grad():
            dt = torch.exp(torch.rand(self.d_inner, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[batch, T, d_model]`` → ``[batch, T, d_model]``."""
        T = hidden.shape[1]
        xz = self.in_proj(hidden).transpose(1, 2)  # [b, 2E, T]
        x, z = xz.chunk(2, dim=1)
        x = F.silu(self.conv1d(x)[..., :T])  # causal: drop the right padding
        dt, Bm, Cm = self.x_proj(x.transpose(1, 2)).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # [b, E, T]; bias goes to the scan
        A = -torch.exp(self.A_log)
        y = selective_scan_fn(
            x, delta, A, Bm.transpose(1, 2), Cm.transpose(1, 2), self.D, z,
            delta_bias=self.dt_proj.bias, delta_softplus=True,
        )
        return self.out_proj(y.transpose(1, 2))


class TinyLMOutput(NamedTuple):
    """``loss`` (None without labels) and ``logits [batch, T, vocab]``."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class TinyMambaLM(nn.Module):
    """A small Mamba language model: embedding, ``n_layers`` × (RMSNorm → SelectiveSSM,
    residual), final RMSNorm, LM head.

    ``forward(input_ids [batch, T], labels=None)`` returns :class:`TinyLMOutput`; with labels
    the loss is the mean next-token cross entropy (labels shifted inside, ``-100`` ignored,
    as in Hugging Face causal LMs). ``mixer`` keywords go to each mixer (``mixer_class``:
    a subclass swaps the layer, e.g. :class:`~longctx_compiler.nn.TinyMamba2LM`).
    """

    mixer_class: type[nn.Module] = SelectiveSSM

    def __init__(self, vocab_size: int = 64, d_model: int = 16, n_layers: int = 2, d_state: int = 4, d_conv: int = 4, expand: int = 2, *,
                 device=None, dtype=None, **mixer):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.embedding = nn.Embedding(vocab_size, d_model, **kw)
        self.norms = nn.ModuleList(RMSNorm(d_model, **kw) for _ in range(n_layers))
        self.mixers = nn.ModuleList(self.mixer_class(d_model, d_state, d_conv, expand, **mixer, **kw) for _ in range(n_layers))
        self.norm_f = RMSNorm(d_model, **kw)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, **kw)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> TinyLMOutput:
        h = self.embedding(input_ids)
        for norm, mixer in zip(self.norms, self.mixers):
            h = h + mixer(norm(h))
        logits = self.lm_head(self.norm_f(h))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return TinyLMOutput(loss, logits)
