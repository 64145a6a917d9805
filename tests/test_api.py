"""optimize / explain / report / pass infrastructure, with the test-only silu pass."""

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from silu_test_pass import BrokenPass, SiluToCustomOp

import longctx_compiler as lc
from longctx_compiler.backend import PassFailure
from longctx_compiler.testing import assert_gradients_match, make_tensor


def cfg(*passes, **kw):
    return lc.Config(backend="aot_eager", extra_passes=passes, **kw)


class MLP(torch.nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.up = torch.nn.Linear(d, 2 * d, dtype=torch.float64)
        self.down = torch.nn.Linear(2 * d, d, dtype=torch.float64)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x):
        return self.down(self.drop(F.silu(self.up(x))))


def test_module_wrapper_is_the_original_for_training_code():
    m = MLP()
    om = lc.optimize(m, config=cfg(SiluToCustomOp()))
    assert list(om.state_dict()) == list(m.state_dict())
    assert [p is q for p, q in zip(om.parameters(), m.parameters())] == [True] * 4
    assert [n for n, _ in om.named_parameters()] == [n for n, _ in m.named_parameters()]
    om.eval()
    assert not m.training
    x = make_tensor((2, 5, 8), seed=0)
    torch.testing.assert_close(om(x), m(x), rtol=1e-12, atol=1e-12)
    om.train()
    assert m.training
    sd = {k: v + 1 for k, v in m.state_dict().items()}
    om.load_state_dict(sd)
    assert torch.equal(m.up.weight, sd["up.weight"])
    # unknown attributes reach the original module
    assert om.up is m.up


def test_decorator_forms():
    @lc.optimize
    def f(x):
        return F.silu(x).sum()

    @lc.optimize(config=cfg(SiluToCustomOp()))
    def g(x):
        return F.silu(x).sum()

    @lc.optimize(backend="aot_eager", strict=True)
    def h(x):
        return F.silu(x).sum()

    x = make_tensor((4, 6), seed=1)
    for fn in (f, g, h):
        torch.testing.assert_close(fn(x), F.silu(x).sum())
    assert g.report.count("test_silu_to_custom_op") == 1
    assert f.report.count() == 0
    assert h.longctx_config.strict and g.__name__ == "g"


def test_pass_rewrites_records_provenance_and_gradients_match():
    m = MLP().eval()
    om = lc.optimize(MLP().eval(), config=cfg(SiluToCustomOp()))
    om.load_state_dict(m.state_dict())
    x = make_tensor((3, 7, 8), seed=2, requires_grad=True)
    assert_gradients_match(m, om, [x])
    report = om.report
    assert report.count("test_silu_to_custom_op") == 1
    (rw,) = report.rewrites
    assert rw.kind == "silu -> longctx_test.silu"
    assert "test_api.py" in rw.site
    after = report.graphs[0].after
    added = [n for n in after.nodes if n.pass_name == "test_silu_to_custom_op"]
    assert [n.name for n in added] == rw.nodes_added and "longctx_test.silu" in added[0].target
    assert not any("silu" in n.target and n.pass_name is None for n in after.nodes if n.op == "call_function")
    js = report.to_json()
    json.dumps(js)
    assert js["rewrites"][0]["pass"] == "test_silu_to_custom_op" and js["refusals"] == []
    assert set(js["rewrites"][0]) >= {"pass", "kind", "site", "nodes_replaced", "nodes_added"}
    assert "test_silu_to_custom_op" in str(report)


def test_refusal_is_recorded_and_graph_untouched():
    def f(x):
        y = x * 2
        return F.silu(y, inplace=True).sum()

    of = lc.optimize(f, config=cfg(SiluToCustomOp()))
    x = make_tensor((4,), seed=3)
    torch.testing.assert_close(of(x), f(x.clone()))
    assert of.report.count() == 0
    (ref,) = of.report.refusals
    assert "in-place" in ref.reason and ref.pass_name == "test_silu_to_custom_op"
    assert of.report.to_json()["refusals"][0]["reason"] == ref.reason


def test_failing_pass_falls_back_with_warning_and_strict_raises(caplog):
    def f(x):
        return F.silu(x).sum()

    x = make_tensor((5,), seed=4)
    of = lc.optimize(f, config=cfg(BrokenPass()))
    with pytest.warns(RuntimeWarning, match="compiling this graph without rewrites"):
        out = of(x)
    # the fallback compiled the original graph: silu, not the half-rewritten tanh
    torch.testing.assert_close(out, F.silu(x).sum())
    assert of.report.fallbacks and "deliberate failure" in of.report.fallbacks[0]
    assert "FALLBACK" in str(of.report)

    torch._dynamo.reset()
    strict = lc.optimize(f, config=cfg(BrokenPass(), strict=True))
    with pytest.raises(PassFailure, match="deliberate failure"):
        strict(x)


def test_no_recompile_when_sequence_length_changes():
    m = MLP().eval()
    om = lc.optimize(m, config=cfg(SiluToCustomOp()))
    for t in (5, 9, 17, 33):
        x = make_tensor((2, t, 8), seed=t)
        torch.testing.assert_close(om(x), m(x))
    assert om.compile_count == 1
    # the report is the latest compilation's, kept across calls that did not recompile
    assert om.report.count("test_silu_to_custom_op") == 1


def test_explain_reports_without_training():
    m = MLP()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    report = lc.explain(m, make_tensor((2, 5, 8), seed=5), config=cfg(SiluToCustomOp()))
    assert report.count("test_silu_to_custom_op") == 1
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())


def test_logging_goes_to_the_library_logger(caplog):
    with caplog.at_level(logging.INFO, logger="longctx_compiler"):
        lc.explain(lambda x: F.silu(x), make_tensor((3,), seed=6), config=cfg(SiluToCustomOp()))
    assert any("test_silu_to_custom_op rewrote" in r.getMessage() for r in caplog.records)


def test_statements_kept_for_their_side_effect_survive_the_passes():
    # ``h.mul_(2)`` as a statement has no users in the graph; the dead-code elimination
    # that follows each pass must not drop it (a silently wrong result otherwise).
    def f(x):
        h = x.clone()
        h.mul_(2.0)
        h[0] = 5.0
        return x + h

    x = torch.randn(3, dtype=torch.float64)
    opt = lc.optimize(f, backend="aot_eager", strict=True)
    torch.testing.assert_close(opt(x), f(x), rtol=0, atol=0)
