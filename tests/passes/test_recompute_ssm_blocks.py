"""The block-recompute pass: blocks around adjoint-sharded scans become checkpoint regions.

Exactness in float64 (the recomputed forward is the same arithmetic), the rewrite fired on
every layer, the scan's forward runs once per step (its outputs are saved, not recomputed),
saved activations shrink, and every refusal carries its reason.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import longctx_compiler as lc
from lm_helpers import ids_for, lm_call, loss_of
from longctx_compiler.kernels.selective_scan import op as scan_op
from longctx_compiler.memory import measure_step
from longctx_compiler.nn import SelectiveSSM, TinyMambaLM, selective_scan_fn
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match

PASS = "recompute_ssm_blocks"


def tiny(layers=2, seed=0):
    torch.manual_seed(seed)
    return TinyMambaLM(vocab_size=64, d_model=16, n_layers=layers, d_state=4, dtype=torch.float64)


def optimized(model, **ssm):
    # Blocks this pass would otherwise leave to adjoint_sharded_blocks (tested on its own).
    return lc.optimize(model, backend="aot_eager", strict=True, ssm={"chunk_size": 8, "shard_blocks": False, **ssm})


@pytest.fixture
def scan_calls(monkeypatch):
    """Counts the scan kernels' forward and backward runs."""
    calls = {"fwd": 0, "bwd": 0}
    impl = scan_op._impl

    def counting(device):
        fwd, bwd = impl(device)

        def f(*a, **k):
            calls["fwd"] += 1
            return fwd(*a, **k)

        def b(*a, **k):
            calls["bwd"] += 1
            return bwd(*a, **k)

        return f, b

    monkeypatch.setattr(scan_op, "_impl", counting)
    return calls


def test_every_layer_recomputed_exactly_and_the_scan_runs_once(scan_calls):
    eager, opt = tiny(3), optimized(tiny(3))
    for t in (5, 19):  # below and above a chunk: one compile
        assert_gradients_match(eager, opt, [ids_for(t, t)], loss_fn=loss_of, call=lm_call, rtol=EXACT_RTOL)
    assert opt.compile_count == 1
    sites = [r.site.split(" ")[0] for r in opt.report.rewrites if r.pass_name == PASS]
    assert sites == ["mixers.0", "mixers.1", "mixers.2"]
    # The scan's outputs are saved by policy: one forward and one backward per layer per step.
    scan_calls.update(fwd=0, bwd=0)
    ids = ids_for(19, 1)
    opt(ids, labels=ids).loss.backward()
    assert scan_calls == {"fwd": 3, "bwd": 3}


def test_saved_activations_shrink_to_block_inputs():
    ids = ids_for(256, 3, batch=1)

    def saved(recompute):
        model = tiny(2)
        opt = optimized(model, recompute_blocks=recompute)
        opt(ids, labels=ids).loss.backward()  # compile outside the measurement
        model.zero_grad(set_to_none=True)
        step = measure_step(lambda: opt(ids, labels=ids).loss.backward(), parameters=model)
        return opt, step.saved_for_backward_bytes

    plain_opt, plain = saved(False)
    rec_opt, rec = saved(True)
    assert plain_opt.report.count(PASS) == 0 and rec_opt.report.count(PASS) == 2
    # Without recompute each mixer keeps its projections, convolution, activation, Δ, gate
    # and the scan's inputs (well over six [T, d_inner] float64 tensors); with it, its input
    # [T, d_model] and the scan's outputs. The LM head and loss keep the same in both.
    d_inner, T = 32, 256
    assert plain - rec >= 2 * 5 * T * d_inner * 8, (plain, rec)


class _Block(nn.Module):
    """norm → mixer (one SelectiveSSM) with an optional extra op inside the block."""

    def __init__(self, extra):
        super().__init__()
        self.mixer = SelectiveSSM(8, d_state=4, dtype=torch.float64)
        self.extra = extra

    def forward(self, x):
        h = self.mixer(x)
        if self.extra == "dropout":
            h = F.dropout(h, p=0.1, training=True)
        elif self.extra == "inplace":
            h = h.clone()
            h.mul_(2.0)
        return x + h


class _Stack(nn.Module):
    def __init__(self, extra):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(extra), _Block(None)])

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("extra, reason", [("dropout", "random"), ("inplace", "in place")])
def test_refused_blocks_say_why_and_the_others_still_recompute(extra, reason):
    torch.manual_seed(0)
    model = _Stack(extra)
    opt = optimized(model)
    x = torch.randn(1, 12, 8, dtype=torch.float64, requires_grad=True)
    opt(x).sum().backward()
    refusals = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert len(refusals) == 1 and reason in refusals[0].reason, refusals
    assert refusals[0].site.startswith("blocks.0")
    assert [r.site.split(" ")[0] for r in opt.report.rewrites if r.pass_name == PASS] == ["blocks.1"]


def test_a_scan_outside_any_module_is_left_alone():
    def fn(u, delta, A, B, C):
        return selective_scan_fn(u, delta, A, B, C).square().sum()

    g = torch.Generator().manual_seed(0)
    args = [torch.randn(1, 4, 10, generator=g, dtype=torch.float64), torch.rand(1, 4, 10, generator=g, dtype=torch.float64),
            -torch.rand(4, 3, generator=g, dtype=torch.float64), torch.randn(1, 3, 10, generator=g, dtype=torch.float64),
            torch.randn(1, 3, 10, generator=g, dtype=torch.float64)]
    args = [a.requires_grad_() for a in args]
    opt = lc.optimize(fn, backend="aot_eager", strict=True)
    opt(*args).backward()
    assert opt.report.count("adjoint_sharded_scan") == 1 and opt.report.count(PASS) == 0
    (refusal,) = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert "not inside a module" in refusal.reason


def test_disabled_by_config():
    opt = optimized(tiny(), recompute_blocks=False)
    ids = ids_for(9, 0)
    opt(ids, labels=ids).loss.backward()
    assert opt.report.count("adjoint_sharded_scan") == 2 and opt.report.count(PASS) == 0
