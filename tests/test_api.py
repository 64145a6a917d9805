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
    # the wording is the backend's; what matters is that the rewrite is logged on our logger
    assert any(r.name == "longctx_compiler" and "test_silu_to_custom_op" in r.getMessage() for r in caplog.records)


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


# -- what training libraries see: signature, class, copies, in-place compile --------------


class Keyworded(torch.nn.Module):
    """A model whose forward names its inputs, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.mlp = MLP().eval()

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        out = self.mlp(input_ids)
        return out if labels is None else ((out - labels) ** 2).sum()


def test_wrapper_shows_the_original_forward_signature_and_class():
    import inspect

    m = Keyworded()
    om = lc.optimize(m, config=cfg(SiluToCustomOp()))
    # Trainer keeps the dataset columns named by the forward's parameters
    assert inspect.signature(om.forward) == inspect.signature(m.forward)
    assert list(inspect.signature(om.forward).parameters) == ["input_ids", "attention_mask", "labels"]
    # ... and reads label names from the class's forward (TRL copies it with functools.wraps)
    assert inspect.signature(type(om).forward) == inspect.signature(Keyworded.forward)
    assert isinstance(om, Keyworded) and isinstance(om, lc.OptimizedModule) and om.__class__ is Keyworded
    x = make_tensor((2, 5, 8), seed=7)
    torch.testing.assert_close(om(input_ids=x), m(input_ids=x), rtol=1e-12, atol=1e-12)
    assert om.report.count("test_silu_to_custom_op") == 1


def test_wrapper_deepcopy_and_pickle_rebuild_an_optimized_copy():
    import copy
    import pickle

    m = Keyworded()
    om = lc.optimize(m, config=cfg(SiluToCustomOp()))
    x = make_tensor((2, 5, 8), seed=8)
    expected = m(input_ids=x)
    om(input_ids=x)
    for clone in (copy.deepcopy(om), pickle.loads(pickle.dumps(om))):
        assert isinstance(clone, lc.OptimizedModule) and clone.original is not m
        assert clone.longctx_config.backend == "aot_eager"
        assert [p.name for p in clone.longctx_config.extra_passes] == ["test_silu_to_custom_op"]
        assert all(torch.equal(a, b) for a, b in zip(clone.state_dict().values(), m.state_dict().values()))
        assert all(p is not q for p, q in zip(clone.parameters(), m.parameters()))
        torch.testing.assert_close(clone(input_ids=x), expected, rtol=1e-12, atol=1e-12)
        # compiled again on its own first call, with the rewrite
        assert clone.compile_count == 1 and clone.report.count("test_silu_to_custom_op") == 1


def test_wrapper_warns_when_a_replaced_forward_bypasses_it():
    # What TRL's SFTTrainer does to the model it is given: a new forward, bound to the
    # wrapper, that calls the wrapped model's parts directly.
    import types

    m = Keyworded()
    om = lc.optimize(m, config=cfg(SiluToCustomOp()))

    def fused_forward(self, input_ids=None, **kwargs):
        return self.mlp(input_ids).sum()

    om.forward = types.MethodType(fused_forward, om)
    x = make_tensor((2, 5, 8), seed=9, requires_grad=True)
    with pytest.warns(lc.api.BypassWarning, match="did not go through the compiler: its forward was replaced by .*fused_forward"):
        om(input_ids=x).backward()
    assert om.compile_count == 0
    # once per wrapper, not per step
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", lc.api.BypassWarning)
        om(input_ids=x)


def test_inplace_compiles_the_same_object_and_keeps_its_class():
    import inspect

    m = Keyworded()
    ref = Keyworded()
    ref.load_state_dict(m.state_dict())
    assert lc.optimize(m, config=cfg(SiluToCustomOp()), inplace=True) is m
    assert type(m) is Keyworded and inspect.signature(m.forward) == inspect.signature(ref.forward)
    assert list(m.state_dict()) == list(ref.state_dict())
    x = make_tensor((3, 7, 8), seed=10, requires_grad=True)
    assert_gradients_match(ref, m, [x])
    assert m.longctx.report.count("test_silu_to_custom_op") == 1 and m.longctx.compile_count == 1
    # a forward replaced after the patch (TRL does this) is compiled too: model(...) is
    # compiled, not the forward seen at patch time
    m.forward = lambda input_ids=None, **kw: m.mlp(input_ids) * 2
    torch.testing.assert_close(m(input_ids=x), 2 * ref.mlp(x), rtol=1e-12, atol=1e-12)
    assert m.longctx.compile_count == 2 and m.longctx.report.count("test_silu_to_custom_op") == 1
    with pytest.raises(TypeError, match="already compiled in place"):
        lc.optimize(m, inplace=True)
    with pytest.raises(TypeError, match="already compiled in place"):
        lc.optimize(m)
    with pytest.raises(TypeError, match="takes an nn.Module"):
        lc.optimize(lambda x: x, inplace=True)
    lc.integrations.unpatch(m)
    assert not hasattr(m, "longctx") and m.__dict__.get("_compiled_call_impl") is None


def test_inplace_survives_deepcopy_and_pickle_and_explain_reads_it():
    import copy
    import pickle

    m = lc.optimize(Keyworded(), config=cfg(SiluToCustomOp()), inplace=True)
    x = make_tensor((2, 5, 8), seed=11)
    expected = m(input_ids=x)
    for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(clone) is Keyworded and clone.longctx is not m.longctx
        torch.testing.assert_close(clone(input_ids=x), expected, rtol=1e-12, atol=1e-12)
        # the copy runs its own compile, on itself
        assert clone.longctx.compile_count == 1 and clone.longctx.report.count("test_silu_to_custom_op") == 1
    report = lc.explain(m, input_ids=x)
    assert report.count("test_silu_to_custom_op") == 1


def test_inplace_warns_when_another_compile_traces_it():
    m = lc.optimize(Keyworded(), config=cfg(SiluToCustomOp()), inplace=True)
    outer = torch.compile(m, backend="eager")
    x = make_tensor((2, 5, 8), seed=12)
    with pytest.warns(lc.api.BypassWarning, match="another torch.compile is tracing it"):
        torch.testing.assert_close(outer(input_ids=x), m.mlp(x), rtol=1e-12, atol=1e-12)
    assert m.longctx.compile_count == 0


def test_first_training_call_that_compiles_nothing_warns():
    # the model runs under torch.compiler.disable: Dynamo never hands us a graph
    mlp = MLP()
    disabled = torch.compiler.disable(lambda x: mlp(x).sum())
    of = lc.optimize(lambda x: disabled(x), config=cfg(SiluToCustomOp()))
    x = make_tensor((2, 8), seed=13, requires_grad=True)
    with pytest.warns(lc.api.BypassWarning, match="ran without compiling any graph"):
        of(x)
