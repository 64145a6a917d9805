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


@pytest.mark.parametrize("name", ["mistral", "gemma2", "gemma3"])
def test_windowed_and_soft_capped_layers_are_pipelined_chunk_by_chunk_and_exact(name):
    # Layer chunks of 4 with windows of 5 and 6: each chunk reads the part of the K/V history
    # in its band (the band starts inside an earlier chunk); Gemma 2 soft-caps every score;
    # Gemma 3 alternates windowed and full layers. T = 9 and 23: one and several chunks of
    # history. (gpt-oss's experts update a tensor in place, which keeps its layers whole;
    # sinks in pipelined layers: tests/passes/test_pipelined_layers.py.)
    build, rtol = (lambda: mistral(5, "sdpa"), EXACT_RTOL) if name == "mistral" else _families()[name]
    torch.manual_seed(0)
    eager = build().double()
    torch.manual_seed(0)
    opt = lc.optimize(build().double(), backend="aot_eager", strict=True, lm_loss={"enabled": False},
                      attention={"chunk_size": 4, "offload": False}, layers={"enabled": True, "chunk_size": 4})
    for t in (9, 23):
        assert_gradients_match(eager, opt, [ids_for(t, t)], loss_fn=loss_of, call=train_call, rtol=rtol)
    assert opt.report.count("pipelined_layers") == 2, opt.report
    assert not [r for r in opt.report.refusals if r.pass_name == "pipelined_layers"]
    assert opt.compile_count == 1


def _families():
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=64, head_dim=8, max_position_embeddings=512)
    return {
        # eager attention with logit soft-capping (50.0 by default) on every layer, a sliding
        # window on every other one; transformers' softmax in float32
        "gemma2": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
            **common, sliding_window=6, attn_logit_softcapping=5.0, attn_implementation="eager")), 1e-5),
        "gemma3": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
            **common, sliding_window=6, attn_implementation="eager")), 1e-5),
        # learned attention sinks and sliding layers; experts (MoE) between them, batched
        # (grouped_mm, the default, has no float64 kernel on CPU; the "eager" experts loop over
        # the experts a batch hits in Python, which Dynamo specialises: a graph per routing)
        "gpt-oss": (lambda: transformers.GptOssForCausalLM(transformers.GptOssConfig(
            **common, sliding_window=6, num_local_experts=4, num_experts_per_tok=2, attn_implementation="eager",
            experts_implementation="batched_mm")), EXACT_RTOL),
        "gpt2-eager": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, attn_implementation="eager", attn_pdrop=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0, scale_attn_by_inverse_layer_idx=True)), EXACT_RTOL),
        "gpt2-sdpa": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=64, attn_implementation="sdpa", attn_pdrop=0.0, resid_pdrop=0.0,
            embd_pdrop=0.0)), EXACT_RTOL),
    }


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "gpt-oss", "gpt2-eager", "gpt2-sdpa"])
def test_family_is_rewritten_on_every_layer_and_exact(name):
    build, rtol = _families()[name]
    torch.manual_seed(0)
    eager = build().double()
    torch.manual_seed(0)
    opt = optimized(build().double(), 4)

    @settings(max_examples=3, deadline=None)
    @given(t=st.sampled_from([5, 6, 7, 19]), seed=st.integers(0, 2**16))
    def prop(t, seed):
        ids = ids_for(t, seed)
        report = assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=train_call, rtol=rtol)
        assert report.errors["loss"][0] <= rtol

    prop()
    assert opt.compile_count == 1 and len(opt.report.graphs) == 1  # no graph break (GPT-2's once-only warning)
    sites = [r for r in opt.report.rewrites if r.pass_name == "chunked_attention"]
    assert len(sites) == 2, opt.report
    if name == "gemma2":
        assert [r.details["softcap"] for r in sites] == [5.0, 5.0]
    if name == "gpt-oss":
        assert all(r.details["sinks"] for r in sites)
    if name.startswith("gemma") or name == "gpt-oss":  # each layer's window as its config says
        want = [6 if kind == "sliding_attention" else None for kind in eager.config.layer_types]
        assert [r.details["window"] for r in sites] == want, want


def test_an_unread_softmax_attention_is_reported_not_silent():
    class Odd(torch.nn.Module):
        def forward(self, q, k, v):
            s = torch.matmul(q, k.transpose(2, 3)).exp()  # not scaled scores: we cannot read it
            return torch.matmul(torch.softmax(s, dim=-1), v)

    q = torch.randn(1, 2, 6, 4, dtype=torch.float64)
    opt = lc.optimize(Odd(), backend="aot_eager")
    opt(q, q, q)
    reasons = [r.reason for r in opt.report.refusals if r.pass_name == "chunked_attention"]
    assert len(reasons) == 1 and "not read as attention" in reasons[0] and "exp" in reasons[0], opt.report
