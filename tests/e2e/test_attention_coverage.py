"""Attention the way more causal-LM families write it: sliding windows (Mistral), float64
exactness of the loss and every gradient against eager, the rewrite on every layer, one
compile across lengths."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for, loss_of
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match

transformers = pytest.importorskip("transformers")


def mistral(window, attn="sdpa", layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=512, sliding_window=window, attn_implementation=attn)
    return transformers.MistralForCausalLM(cfg).double()


def train_call(model, ids):
    # use_cache=False, as in training: with a cache, transformers' sliding-window cache slices
    # its keys by the window, which specialises the graph on T against it
    return model(ids, labels=ids, use_cache=False)


def optimized(model, chunk):
    # The loss left to transformers: the comparison is of the attention alone (the tiled loss
    # computes in float64 where transformers casts the logits to float32).
    return lc.optimize(model, backend="aot_eager", strict=True, lm_loss={"enabled": False},
                       attention={"chunk_size": chunk, "offload": False})


@pytest.mark.parametrize("attn, rtol", [("sdpa", EXACT_RTOL), ("eager", 1e-5)])
@pytest.mark.parametrize("window, chunk", [(5, 8), (12, 4)])
def test_mistral_sliding_window_is_exact_with_one_compile(attn, rtol, window, chunk):
    # windows smaller and larger than the chunk; T below, at and above the window. The eager
    # spelling computes its softmax in float32 even in a float64 model (ours in float64).
    eager, opt = mistral(window, attn), optimized(mistral(window, attn), chunk)

    @settings(max_examples=5, deadline=None)
    @given(t=st.sampled_from([2, window - 1, window, window + 1, 3 * window + 2, 40]), seed=st.integers(0, 2**16))
    def prop(t, seed):
        ids = ids_for(t, seed)
        report = assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=train_call, rtol=rtol)
        assert report.errors["loss"][0] <= rtol
        windows = [r.details["window"] for r in opt.report.rewrites if r.pass_name == "chunked_attention"]
        assert windows == [window, window], opt.report

    prop()
    assert opt.compile_count == 1


def test_a_windowed_layer_is_not_pipelined_and_says_why():
    opt = lc.optimize(mistral(5), backend="aot_eager", attention={"chunk_size": 4}, layers={"enabled": True, "chunk_size": 4})
    ids = ids_for(16, 0)
    opt(ids, labels=ids).loss.backward()
    assert opt.report.count("chunked_attention") == 2
    reasons = [r.reason for r in opt.report.refusals if r.pass_name == "pipelined_layers"]
    assert len(reasons) == 2 and all("sliding window of 5" in r for r in reasons), opt.report
