"""A factory for the CLI test: ``python -m longctx_compiler explain cli_factory:make``."""

import torch


class Attn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def make():
    return Attn(), (torch.randn(2, 12, 16),)


def needs_args(width):
    return Attn(), (torch.randn(2, 12, width),)


def raises():
    raise RuntimeError("the checkpoint file is missing")
