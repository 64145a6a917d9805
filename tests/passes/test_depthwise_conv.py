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
