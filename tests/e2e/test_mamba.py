"""Adjoint-sharded scans end to end: Hugging Face Mamba (scan captured at call time, both
scan paths), TinyMambaLM (canonical op from the model), truncated mode, Inductor."""

import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for, lm_call, loss_and_grads, loss_of, worst_gradient_error
from longctx_compiler.capture import capture_context, captured_functions
from longctx_compiler.nn import TinyMambaLM
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, relative_error

transformers = pytest.importorskip("transformers")

CHUNK = 8
KIND = "transformers mamba scan -> selective_scan(adjoint-sharded)"


def mamba(assoc, dtype=torch.float64, seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(
        hidden_size=32, state_size=8, num_hidden_layers=layers, vocab_size=64, use_associative_scan=assoc,
    )
    return transformers.MambaForCausalLM(cfg).to(dtype)


def scan_rewrites(opt):
    """The report's scan-planning rewrites (the block-recompute rewrites are apart)."""
    return [r for r in opt.report.rewrites if r.pass_name == "adjoint_sharded_scan"]


def optimized(model, **ssm):
    return lc.optimize(model, backend="aot_eager", strict=True, ssm={"chunk_size": CHUNK, "block_chunk_size": CHUNK, **ssm})


@pytest.mark.parametrize("assoc", [False, True], ids=["loop", "associative_scan"])
def test_hf_mamba_loss_and_every_gradient_match_eager(assoc):
    # transformers computes parts of the scan in float32 even in a float64 model (B and u
    # go through .float()); ours stays in float64, so the tolerance is float32 round-off.
    eager, opt = mamba(assoc), optimized(mamba(assoc))

    # T below and above CHUNK share one graph.
    @settings(max_examples=3, deadline=None)
    @given(t=st.integers(2, 40), seed=st.integers(0, 2**16))
    def prop(t, seed):
        ids = ids_for(t, seed)
        report = assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call, rtol=1e-5)
        assert report.errors["loss"][0] <= 1e-5
        # one canonical node per layer, planned by the rewrite
        assert opt.report.count("adjoint_sharded_scan", KIND) == 2

    prop()
    assert opt.compile_count == 1
    sites = [r.site for r in scan_rewrites(opt)]
    assert all(s.startswith(f"backbone.layers.{i}.mixer (modeling_mamba.py") for i, s in enumerate(sites)), sites
    # every layer runs chunk by chunk along the sequence (T = 2..40 spans 1..5 chunks)
    blocks = [r for r in opt.report.rewrites if r.pass_name == "adjoint_sharded_blocks"]
    assert [r.site.split(" ")[0] for r in blocks] == ["backbone.layers.0", "backbone.layers.1"], blocks
    assert all(r.details["halo"] == 3 for r in blocks)  # the convolution's reach: d_conv - 1
    # no unrolled loop or log-depth tree is left: the graph has no per-step matmul/stack
    after = opt.report.graphs[0].after
    assert not any(n.target in ("torch.stack", "torch.matmul") for n in after.nodes)
    details = opt.report.rewrites[0].details
    assert details["chunk_size"] == CHUNK and details["mode"] == "exact" and details["source"] == "transformers mamba scan"


def test_capture_is_scoped_and_does_not_recompile():
    import transformers.models.mamba.modeling_mamba as mm

    original = mm.mamba_selective_scan
    opt = optimized(mamba(False))
    for t in (12, 20, 17):
        ids = ids_for(t, t)
        opt(ids, labels=ids).loss.backward()
        # outside the call the library's own function is back
        assert mm.mamba_selective_scan is original
    assert opt.compile_count == 1
    with capture_context(lc.Config()):
        assert mm.mamba_selective_scan is not original
        with capture_context(lc.Config()):  # re-entrant
            pass
        assert mm.mamba_selective_scan is not original
    assert mm.mamba_selective_scan is original
    with capture_context(lc.Config(ssm={"enabled": False})):
        assert mm.mamba_selective_scan is original


def test_every_mamba_family_copy_is_recognised_by_signature():
    # transformers imports model files lazily: import each (an earlier test may not have)
    for name in ("mamba", "falcon_mamba", "jamba", "zamba"):
        __import__(f"transformers.models.{name}.modeling_{name}")
    found = {(m, f) for m, f, _ in captured_functions()}
    for name in ("mamba", "falcon_mamba", "jamba", "zamba"):
        assert (f"transformers.models.{name}.modeling_{name}", "mamba_selective_scan") in found
    # the one-step decoder update is not a scan
    assert not any("state_update" in f for _, f in found)


def test_falcon_mamba_is_rewritten_too():
    torch.manual_seed(0)
    cfg = transformers.FalconMambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=64)
    eager = transformers.FalconMambaForCausalLM(cfg).to(torch.float64)
    opt = optimized(transformers.FalconMambaForCausalLM(cfg).to(torch.float64))
    opt.load_state_dict(eager.state_dict())
    ids = ids_for(20, 3)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call, rtol=1e-5)
    assert opt.report.count("adjoint_sharded_scan", "transformers falcon_mamba scan -> selective_scan(adjoint-sharded)") == 2


def test_explain_reports_the_captured_scans():
    report = lc.explain(mamba(True), ids_for(16, 0), config=lc.Config(ssm={"chunk_size": CHUNK}))
    assert report.count("adjoint_sharded_scan", KIND) == 2


def tiny(seed=0, layers=2):
    torch.manual_seed(seed)
    return TinyMambaLM(vocab_size=64, d_model=16, n_layers=layers, d_state=4, dtype=torch.float64)


def test_tiny_mamba_float64_exact():
    eager, opt = tiny(), optimized(tiny(), chunk_size=5)
    for t in (11, 24, 37):
        ids = ids_for(t, t)
        assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call, rtol=EXACT_RTOL)
        assert opt.report.count("adjoint_sharded_scan", "selective_scan -> selective_scan(adjoint-sharded)") == 2
    assert opt.compile_count == 1


def _grads(model, ids):
    out = model(ids, labels=ids)
    params = dict(model.named_parameters())
    g = torch.autograd.grad(out.loss, list(params.values()))
    return dict(zip(params, g))


def test_truncated_mode_differs_below_the_window_and_matches_above():
    ids = ids_for(24, 5)
    exact = _grads(optimized(tiny(), chunk_size=5), ids)
    short = optimized(tiny(), chunk_size=5, mode="truncated", window=4)
    g_short = _grads(short, ids)
    long_ = optimized(tiny(), chunk_size=5, mode="truncated", window=64)
    g_long = _grads(long_, ids)
    # the state-flowing gradients (A, Δ, B, u paths) change; the readout-local ones do not
    assert relative_error(g_short["mixers.0.A_log"], exact["mixers.0.A_log"]) > 1e-3
    assert relative_error(g_short["mixers.1.D"], exact["mixers.1.D"]) <= EXACT_RTOL
    assert max(relative_error(g_long[k], exact[k]) for k in exact) <= EXACT_RTOL
    for opt, window in ((short, 4), (long_, 64)):
        assert opt.report.count("adjoint_sharded_scan") == 2
        assert all(r.details["mode"] == "truncated" and r.details["window"] == window for r in scan_rewrites(opt))
    assert "truncated" not in {r.details["mode"] for r in scan_rewrites(optimized(tiny()))}


def test_truncated_mode_on_hf_mamba():
    ids = ids_for(24, 6)
    exact = _grads(optimized(mamba(False)), ids)
    trunc = optimized(mamba(False), mode="truncated", window=3)
    g = _grads(trunc, ids)
    assert relative_error(g["backbone.layers.0.mixer.A_log"], exact["backbone.layers.0.mixer.A_log"]) > 1e-3
    assert all(r.details["mode"] == "truncated" and r.details["window"] == 3 for r in scan_rewrites(trunc))


@pytest.mark.slow
@pytest.mark.nightly
def test_inductor_within_twice_plain_compile_error():
    eager = mamba(False)
    plain = mamba(False)
    plain.compile(backend="inductor")
    opt = lc.optimize(mamba(False), ssm={"chunk_size": CHUNK})
    ids = ids_for(16, 4)
    ref = loss_and_grads(eager, ids)
    plain_err = worst_gradient_error(plain, ref, ids)
    ours_err = worst_gradient_error(opt, ref, ids)
    assert opt.report.count("adjoint_sharded_scan", KIND) == 2
    assert ours_err <= 2 * plain_err + 1e-12, (ours_err, plain_err)
    assert "transformers.models.mamba.modeling_mamba" in sys.modules
    # Inductor too compiles one graph for every length: the convolution's backward lowering
    # would pin T (it is rewritten into shifted multiply-adds, see passes/depthwise_conv.py).
    assert opt.report.count("depthwise_conv") == 2 and opt.report.count("adjoint_sharded_blocks") == 2
    ids = ids_for(37, 5)
    opt(ids, labels=ids).loss.backward()
    assert opt.compile_count == 1
