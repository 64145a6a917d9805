"""Depthwise conv1d → shifted multiply-adds: exact in float64, one graph for every length,
refusals with reasons."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import longctx_compiler as lc
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, make_tensor

PASS = "depthwise_conv"


class _Conv(nn.Module):
    def __init__(self, channels, taps, padding, bias, groups=None, stride=1):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, taps, padding=padding, bias=bias, groups=groups or channels,
                              stride=stride, dtype=torch.float64)

    def forward(self, x):
        # causal use as in Mamba: keep the first T outputs when padded
        return torch.tanh(self.conv(x))


@pytest.mark.parametrize("taps, padding, bias", [(4, 3, True), (1, 0, False), (3, 1, True), (5, 0, True), (2, 4, False)])
def test_exact_and_one_graph_for_every_length(taps, padding, bias):
    torch.manual_seed(taps * 10 + padding)
    eager = _Conv(6, taps, padding, bias)
    opt = lc.optimize(_Conv(6, taps, padding, bias), backend="aot_eager", strict=True, sequence_dim=2)  # x: [B, C, T]
    opt.load_state_dict(eager.state_dict())

    @settings(max_examples=4, deadline=None)
    # (output length >= 2: a length-1 output would be its own specialisation)
    @given(t=st.integers(max(taps - 2 * padding + 1, 2), 40), seed=st.integers(0, 2**16))
    def prop(t, seed):
        x = make_tensor((2, 6, t), seed=seed, requires_grad=True)
        assert_gradients_match(eager, opt, [x], rtol=EXACT_RTOL)

    prop()
    assert opt.report.count(PASS) == 1
    assert opt.compile_count == 1


@pytest.mark.parametrize("kwargs, reason", [({"groups": 1}, "not depthwise"), ({"stride": 2}, "stride")])
def test_other_convolutions_are_refused_with_the_reason(kwargs, reason):
    opt = lc.optimize(_Conv(4, 3, 1, True, **kwargs), backend="aot_eager", strict=True)
    opt(torch.randn(1, 4, 9, dtype=torch.float64)).sum().backward()
    assert opt.report.count(PASS) == 0
    (refusal,) = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert reason in refusal.reason


def test_padding_same_is_refused():
    conv = nn.Conv1d(4, 4, 3, padding="same", groups=4, dtype=torch.float64)
    opt = lc.optimize(lambda x: F.relu(conv(x)), backend="aot_eager", strict=True)
    opt(torch.randn(1, 4, 9, dtype=torch.float64))
    (refusal,) = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert "padding='same'" in refusal.reason


class _CausalConv(nn.Module):
    """Mamba's use: ``[B, T, C]`` tokens, a causal depthwise filter, the first T outputs."""

    def __init__(self, channels, taps):
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, taps, padding=taps - 1, groups=channels, dtype=torch.float64)

    def forward(self, x):
        return torch.tanh(self.conv(x.transpose(1, 2))[..., : x.shape[1]]).transpose(1, 2)


@pytest.mark.parametrize("taps", [4, 2, 1])
def test_packed_documents_read_zero_across_a_boundary(taps):
    """With ``packed_documents`` each document is filtered as if alone (zero padding at its
    start): outputs and every gradient equal the filter run on each document by itself."""
    torch.manual_seed(taps)
    eager = _CausalConv(3, taps)
    opt = lc.optimize(_CausalConv(3, taps), backend="aot_eager", strict=True, packed_documents=True)
    opt.load_state_dict(eager.state_dict())

    @settings(max_examples=5, deadline=None)
    @given(t=st.integers(2, 24), data=st.data())
    def prop(t, data):
        starts = sorted(data.draw(st.sets(st.integers(1, t - 1), max_size=5)) if t > 1 else [])
        seq = torch.zeros(2, t, dtype=torch.long)
        for s in starts:
            seq[0, s:] += 1  # row 0: the drawn documents; row 1: one document
        x = make_tensor((2, t, 3), seed=t, requires_grad=True)
        out = opt(x, seq_idx=seq)
        pieces = [eager(x[b : b + 1, seq[b] == d]) for b in range(2) for d in seq[b].unique()]
        alone = torch.cat([torch.cat(pieces[: len(starts) + 1], 1), pieces[-1]], 0)
        assert torch.allclose(out, alone, rtol=EXACT_RTOL, atol=0)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *opt.parameters()], g)
        want = torch.autograd.grad(alone, [x, *eager.parameters()], g)
        for a, b in zip(got, want):
            assert torch.allclose(a, b, rtol=EXACT_RTOL, atol=1e-14)

    prop()
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert "documents" in rewrite.details
    assert opt.compile_count == 1


def test_packed_documents_refuse_a_filter_that_is_not_causal():
    # Output i of a centred filter reads token i + 1: "its document" is not defined by the
    # causal rule, so the rewrite refuses and the packed-documents check raises.
    conv = nn.Conv1d(4, 4, 3, padding=1, groups=4, dtype=torch.float64)
    opt = lc.optimize(lambda x: conv(x.transpose(1, 2)).transpose(1, 2), backend="aot_eager", packed_documents=True)
    with pytest.raises(lc.PassFailure, match="convolution along the sequence"):
        opt(torch.randn(1, 9, 4, dtype=torch.float64), seq_idx=torch.tensor([[0] * 4 + [1] * 5]))
