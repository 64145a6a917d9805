"""A Mamba-2 layer whose SSD scan the compiler sees as one ``longctx::ssd_fwd`` node.

The scan is :func:`longctx_compiler.kernels.ssd.ssd_scan`: in eager mode it runs the op
(the chunked implementation, exact), under ``torch.compile`` it traces to one op node. The
block around it (projections, the causal convolution, the gated norm) is ordinary PyTorch,
local along the sequence, so the compiler runs each layer chunk by chunk
(:mod:`longctx_compiler.passes.adjoint_sharded_blocks`), carrying the SSD state between chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from longctx_compiler.kernels.ssd import ssd_scan

from .ssm import TinyMambaLM

__all__ = ["GatedRMSNorm", "Mamba2Mixer", "TinyMamba2LM"]


class GatedRMSNorm(nn.Module):
    """Mamba-2's gated RMSNorm, gate first: ``norm(y · silu(z)) · weight``, normalised over
    groups of ``group_size`` consecutive channels (one group per B/C group, as mamba_ssm's
    ``RMSNormGated(norm_before_gate=False)``). Computed in the input's dtype, so a float64
    model stays float64. ``y, z: [..., dim]``."""

    def __init__(self, dim: int, group_size: int | None = None, eps: float = 1e-5, *, device=None, dtype=None):
        super().__init__()
        group_size = dim if group_size is None else group_size
        if group_size < 1 or dim % group_size:
            raise ValueError(f"GatedRMSNorm: group_size={group_size} must divide dim={dim}")
        self.group_size = group_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = (y * F.silu(z)).unflatten(-1, (-1, self.group_size))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return h.flatten(-2) * self.weight


class Mamba2Mixer(nn.Module):
    """Mamba-2 mixer: in_proj → (z, xBC, Δ) → causal depthwise conv1d + silu over xBC → SSD
    scan of x with B, C, Δ (per-head scalar decay ``A``, skip ``D``, Δ bias and softplus) →
    gated RMSNorm ``norm(y · silu(z))`` → out_proj.

    Input and output ``[batch, T, d_model]``; every operation runs in the module's dtype (the
    scan computes 16-bit inputs in float32).

    Args:
        d_model: model width.
        d_state: N, the state size per head channel.
        d_conv: causal convolution width.
        expand: inner width ``d_inner = expand · d_model``.
        headdim: P, channels per head (``H = d_inner / P`` heads).
        ngroups: G, groups of heads sharing B and C (and a group of the gated norm).
        chunk_size: the SSD scan's chunk Q (saved state ``⌈T/Q⌉`` per head).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes (mamba_ssm's initialisation).
        A_init_range: range of the initial ``-A`` (uniform, stored as a log).
        norm_eps: the gated norm's epsilon.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        d_conv: int = 4,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        chunk_size: int = 256,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        norm_eps: float = 1e-5,
        *,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if min(d_model, d_state, d_conv, expand, headdim, ngroups, chunk_size) < 1:
            raise ValueError("Mamba2Mixer: sizes must be positive")
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba2Mixer: headdim={headdim} must divide d_inner={d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2Mixer: ngroups={ngroups} must divide the {nheads} heads")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_inner = d_model, d_state, d_inner
        self.headdim, self.nheads, self.ngroups, self.chunk_size = headdim, nheads, ngroups, chunk_size
        self.conv_dim = d_inner + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, d_inner + self.conv_dim + nheads, bias=False, **kw)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1, **kw)
        factory = {"device": device, "dtype": dtype or torch.get_default_dtype()}
        # Δ bias so that softplus(bias) is log-uniform in [dt_min, dt_max] (mamba_ssm's init).
        dt = torch.exp(torch.rand(nheads, dtype=torch.float64) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).to(**factory))
        A = torch.empty(nheads, dtype=torch.float64).uniform_(*A_init_range)
        self.A_log = nn.Parameter(torch.log(A).to(**factory))
        self.D = nn.Parameter(torch.ones(nheads, **kw))
        self.norm = GatedRMSNorm(d_inner, d_inner // ngroups, norm_eps, **kw)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **kw)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[batch, T, d_model]`` → ``[batch, T, d_model]``."""
        T = hidden.shape[1]
        G, N = self.ngroups, self.d_state
        z, xBC, dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        xBC = F.silu(self.conv1d(xBC.transpose(1, 2))[..., :T].transpose(1, 2))  # causal: drop the right padding
        x, B, C = xBC.split([self.d_inner, G * N, G * N], dim=-1)
        y = ssd_scan(
            x.unflatten(-1, (self.nheads, self.headdim)), dt, -torch.exp(self.A_log),
            B.unflatten(-1, (G, N)), C.unflatten(-1, (G, N)),
            D=self.D, dt_bias=self.dt_bias, dt_softplus=True, chunk_size=self.chunk_size,
        )
        return self.out_proj(self.norm(y.flatten(-2), z))


class TinyMamba2LM(TinyMambaLM):
    """:class:`TinyMambaLM` with :class:`Mamba2Mixer` layers: embedding, ``n_layers`` ×
    (RMSNorm → Mamba2Mixer, residual), final RMSNorm, LM head. ``headdim``, ``ngroups`` and
    ``chunk_size`` go to the mixers."""

    mixer_class = Mamba2Mixer

    def __init__(self, vocab_size: int = 64, d_model: int = 16, n_layers: int = 2, d_state: int = 4, d_conv: int = 4, expand: int = 2,
                 headdim: int = 8, ngroups: int = 1, chunk_size: int = 256, *, device=None, dtype=None):
        super().__init__(vocab_size, d_model, n_layers, d_state, d_conv, expand, device=device, dtype=dtype,
                         headdim=headdim, ngroups=ngroups, chunk_size=chunk_size)
