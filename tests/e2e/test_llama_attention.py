"""Chunked attention on Hugging Face Llama (GQA): SDPA and eager spellings, float64 exactness,
the dtype rule in float32, offload, refusals, and one compile for many sequence lengths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for, lm_call, loss_and_grads, loss_of, worst_gradient_error
from longctx_compiler.runtime import get_default_pool
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match

transformers = pytest.importorskip("transformers")


def llama(attn="sdpa", layers=2, dtype=torch.float64, seed=0, **extra):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, attn_implementation=attn, **extra,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def optimized(model, **attention):
    # Attention alone: the tiled LM loss computes the loss in float64 where transformers casts
    # the logits to float32, which would blur the float64 comparisons here (it has its own
    # end-to-end tests in test_lm_loss.py).
    return lc.optimize(model, backend="aot_eager", strict=True, lm_loss={"enabled": False},
                       attention={"chunk_size": 8, "offload": False, **attention})


@pytest.mark.parametrize("attn, rtol", [("sdpa", EXACT_RTOL), ("eager", 1e-5)])
def test_float64_loss_and_every_gradient_match_eager(attn, rtol):
    # SDPA computes in float64 in a float64 model: exact. The eager spelling computes its
    # softmax in float32 even there (softmax(..., dtype=float32)); ours stays in float64, so
    # the difference is float32 round-off of the original, not ours.
    eager, opt = llama(attn), optimized(llama(attn))

    @settings(max_examples=6, deadline=None)
    @given(t=st.integers(2, 40), seed=st.integers(0, 2**16))
    def prop(t, seed):
        ids = ids_for(t, seed)
        report = assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call, rtol=rtol)
        assert report.errors["loss"][0] <= rtol
        # The rewrite fired on every layer.
        assert opt.report.count("chunked_attention") == 2

    prop()
    # (T = 1 is left out: a causal LM has no next token to predict, and Dynamo specialises
    # size-1 dims.) Every other length shares one graph.
    assert opt.compile_count == 1
    assert all(r.site.startswith(f"model.layers.{i}.self_attn") for i, r in enumerate(opt.report.rewrites))


def test_eager_spelling_report_and_repeat_kv_removed():
    opt = optimized(llama("eager"))
    ids = ids_for(12, 0)
    opt(ids, labels=ids).loss.backward()
    kinds = {r.kind for r in opt.report.rewrites}
    assert kinds == {"matmul-softmax-matmul -> chunked_attention"}
    assert all(r.details["repeat_kv_removed"] and r.details["causal"] and r.details["gqa_groups"] == 2 for r in opt.report.rewrites)
    # no [B, H, T, T] matmul is left in the rewritten graph
    after = opt.report.graphs[0].after
    assert not any(n.target in ("torch.matmul", "operator.matmul") for n in after.nodes)


def test_float32_within_twice_plain_pytorch_error():
    ref, base = llama(dtype=torch.float64), llama(dtype=torch.float32)
    cand = optimized(llama(dtype=torch.float32))
    ids = ids_for(33, 1)
    assert_gradients_match(ref, cand, [ids], loss_fn=loss_of, call=lm_call, baseline=base)
    assert cand.report.count("chunked_attention") == 2


def test_offload_keeps_gradients_and_releases_host_copies():
    eager, opt = llama(), optimized(llama(), offload=True)
    pool = get_default_pool()
    ids = ids_for(20, 2)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lm_call)
    assert all(r.kind == "sdpa -> chunked_attention+offload" for r in opt.report.rewrites)
    assert len(opt.report.rewrites) == 2
    # every forward's host copies were released by its backward
    assert pool.live_groups == 0 and pool.bytes_in_use == 0


def test_host_pool_budget_is_enforced_with_a_clear_error():
    from longctx_compiler.runtime import HostMemoryError

    pool = get_default_pool()
    saved_limit = pool.max_bytes
    try:
        opt = optimized(llama(), offload=True, host_pool_bytes=1024)
        ids = ids_for(20, 5)
        with pytest.raises(HostMemoryError, match="budget"):
            opt(ids, labels=ids)
    finally:
        pool.max_bytes = saved_limit
        pool.clear()


def test_refusals_leave_the_graph_alone_with_reasons():
    # dropout in training: a chunked op would draw a different random mask
    opt = optimized(llama(attention_dropout=0.1))
    ids = ids_for(10, 3)
    opt(ids, labels=ids)
    assert opt.report.count("chunked_attention") == 0
    assert len(opt.report.refusals) == 2 and all("dropout" in r.reason for r in opt.report.refusals)

    # the same model in eval mode has no dropout: rewritten
    torch._dynamo.reset()
    opt.eval()
    with torch.no_grad():
        opt(ids)
    assert opt.report.count("chunked_attention") == 2

    # attention probabilities returned to the user: the [T, T] tensor must exist
    torch._dynamo.reset()
    opt = optimized(llama("eager"))
    opt(ids, output_attentions=True)
    assert opt.report.count("chunked_attention") == 0
    assert all("used outside attention" in r.reason for r in opt.report.refusals)


@pytest.mark.slow
@pytest.mark.nightly
def test_inductor_within_twice_plain_compile_error():
    eager = llama()
    plain = llama()
    plain.compile(backend="inductor")
    opt = lc.optimize(llama(), attention={"chunk_size": 8})
    ids = ids_for(24, 4)
    ref = loss_and_grads(eager, ids)
    plain_err = worst_gradient_error(plain, ref, ids)
    ours_err = worst_gradient_error(opt, ref, ids)
    assert opt.report.count("chunked_attention") == 2
    assert ours_err <= 2 * plain_err + 1e-12, (ours_err, plain_err)
