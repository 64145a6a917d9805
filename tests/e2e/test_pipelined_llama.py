"""Sequence-pipelined decoder layers on Hugging Face causal LMs.

Float64, AOT-eager, loss and every gradient against eager (≤ 1e-10): Llama (GQA), Mistral
(no sliding window), Qwen2 (QKV bias), Phi3 (fused qkv), GPT-NeoX (parallel residual,
partial rotary); the pipeline fired on every layer; one compile for every length, hypothesis
over T (below, at and not a multiple of the chunk) and the chunk size (T = 1: in
``test_pipelined_layers.py``; transformers' T = 1 graph builds a mask the attention pass does
not take). The host tier holds the layer inputs and K/V histories between forward and backward
and nothing after; a budget too small fails before the step with a clear error and nothing
updated; Inductor in float32 within twice plain ``torch.compile``'s error.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for
from longctx_compiler.runtime import HostMemoryError, HostPool, get_default_pool, set_default_pool
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, clone_module

transformers = pytest.importorskip("transformers")

PASS = "pipelined_layers"
LAYERS = 2
COMMON = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4, vocab_size=64,
              max_position_embeddings=256, attn_implementation="sdpa")

MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **COMMON)),
    "mistral": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, sliding_window=None, **COMMON)),
    "qwen2": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **COMMON)),
    "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1, **COMMON)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(rotary_pct=0.5, use_parallel_residual=True, **COMMON)),
}


def model(name="llama", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return MODELS[name]().to(dtype).train()


def optimized(m, chunk, backend="aot_eager", offload=False, **attention):
    # The LM loss is left to the model: the logits are compared (transformers' loss casts
    # them to float32, which would blur a float64 comparison).
    return lc.optimize(m, backend=backend, strict=True, lm_loss={"enabled": False},
                       attention={"chunk_size": 4, "offload": offload, **attention},
                       layers={"enabled": True, "chunk_size": chunk, "offload": offload})


def logits_of(m, ids):
    return m(ids, use_cache=False)


def pipelined_everywhere(opt):
    rewrites = [r for r in opt.report.rewrites if r.pass_name == PASS]
    return len(rewrites) == LAYERS and all(r.site.split(" ")[0].endswith(f"layers.{i}") for i, r in enumerate(rewrites))


@pytest.mark.parametrize("chunk", [3, 8])
def test_llama_exact_for_any_length_and_chunk_with_one_compile(chunk):
    eager, opt = model(), optimized(model(), chunk)

    @settings(max_examples=5, deadline=None)
    # T = 1 specialises (its own graph); lengths below, at, and off multiples of the chunk.
    @given(t=st.sampled_from([2, chunk - 1, chunk, chunk + 1, 2 * chunk, 3 * chunk + 2, 29]).filter(lambda t: t >= 2),
           seed=st.integers(0, 2**16))
    def prop(t, seed):
        assert_gradients_match(eager, opt, [ids_for(t, seed)], call=logits_of, rtol=EXACT_RTOL)

    prop()
    assert pipelined_everywhere(opt), opt.report
    assert not opt.report.refusals
    assert opt.compile_count == 1


@pytest.mark.parametrize("name", ["mistral", "qwen2", "phi3", "gpt_neox"])
def test_other_decoder_families_are_exact(name):
    eager, opt = model(name), optimized(model(name), 5)
    for t in (7, 16):
        assert_gradients_match(eager, opt, [ids_for(t, t)], call=lambda m, i: m(i, use_cache=True).logits, rtol=EXACT_RTOL)
    assert pipelined_everywhere(opt), opt.report
    assert opt.compile_count == 1


def test_the_labels_loss_path_is_pipelined_too():
    # transformers' own loss (float32 cast of the logits inside): the same loss as eager.
    eager, opt = model(), optimized(model(), 4)
    ids = ids_for(18, 4)
    assert_gradients_match(eager, opt, [ids], call=lambda m, i: m(i, labels=i), loss_fn=lambda o: o.loss, rtol=1e-6)
    assert pipelined_everywhere(opt)


@pytest.fixture
def pool():
    """A fresh default host pool for the test (restored afterwards)."""
    fresh = HostPool()
    previous = set_default_pool(fresh) or HostPool()
    yield fresh
    set_default_pool(previous)


def test_layer_inputs_and_kv_history_wait_in_the_host_pool(pool):
    m = model()
    opt = optimized(m, 4, offload=True)
    b, t = 2, 19
    ids = ids_for(t, 5, batch=b)
    out = opt(ids, use_cache=False).logits
    cfg = m.config
    head = cfg.hidden_size // cfg.num_attention_heads
    kv_dim = cfg.num_key_value_heads * head
    # per layer: its input x [B, T, hidden], the RoPE tables cos, sin [1, T, head], K and V
    per_layer = (b * t * cfg.hidden_size + 2 * t * head + 2 * b * t * kv_dim) * 8
    assert pool.bytes_in_use == LAYERS * per_layer
    out.sum().backward()
    # released by the backward, and the accumulators of dK/dV with them
    assert pool.bytes_in_use == 0
    assert pool.peak_bytes >= LAYERS * per_layer
    assert pipelined_everywhere(opt)


def test_a_host_budget_too_small_fails_before_the_step_and_changes_nothing(pool):
    m = model()
    opt = optimized(m, 4, offload=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    sgd = torch.optim.SGD(m.parameters(), lr=0.1)
    pool.max_bytes = 4096
    ids = ids_for(40, 6)
    with pytest.raises(HostMemoryError, match="budget"):
        opt(ids, use_cache=False).logits.sum().backward()
        sgd.step()
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert all(p.grad is None for p in m.parameters())
    assert pool.bytes_in_use == 0
    # with room, the same model trains
    pool.max_bytes = None
    opt(ids, use_cache=False).logits.sum().backward()
    assert pool.bytes_in_use == 0


@pytest.mark.slow
def test_inductor_float32_within_twice_plain_torch_compile_error():
    reference = model()
    plain = torch.compile(clone_module(reference, torch.float32))
    cand = optimized(clone_module(reference, torch.float32), 6, backend="inductor")
    ids = ids_for(21, 7)
    assert_gradients_match(reference, cand, [ids], call=logits_of, baseline=plain)
    assert pipelined_everywhere(cand)


def test_bf16_autocast_pipelined_within_twice_plain_pytorch_autocast_error():
    # Trainer(bf16=True): the forward under autocast, the backward outside. Each chunk runs the
    # layer's captured body again, in the autocast state the layer was traced in.
    def autocast_logits(m, ids):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(ids, use_cache=False)

    reference = model()
    plain = clone_module(reference, torch.float32)
    cand = optimized(clone_module(reference, torch.float32), 6)
    ids = ids_for(21, 7)
    assert_gradients_match(reference, cand, [ids], call=autocast_logits, baseline=plain)
    assert pipelined_everywhere(cand)


def jamba(attn_period, dtype=torch.float64):
    """A Jamba stack: an attention layer every ``attn_period`` layers (from layer 1 when the
    period is 2: Mamba, attention, Mamba, attention), no experts, no RoPE (Jamba has none)."""
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, attn_layer_period=attn_period, attn_layer_offset=attn_period - 1, expert_layer_period=100,
        expert_layer_offset=99, num_experts=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)
    return transformers.JambaForCausalLM(cfg).to(dtype).train()


def test_jamba_attention_layers_are_exact():
    # Every layer an attention layer: nothing computed in float32 inside, so exact.
    eager, opt = jamba(1), optimized(jamba(1), 5)
    for t in (7, 16):
        assert_gradients_match(eager, opt, [ids_for(t, t)], call=logits_of, rtol=EXACT_RTOL)
    assert [r.site.split(" ")[0] for r in opt.report.rewrites if r.pass_name == PASS] == [f"model.layers.{i}" for i in range(4)]
    assert opt.compile_count == 1


def test_jamba_hybrid_stack_runs_every_layer_chunk_by_chunk():
    # Mamba layers as adjoint-sharded blocks, attention layers pipelined: every layer chunked.
    # transformers rounds the scan's B and u to float32 (`.float()`) even in a float64 model;
    # ours stays in float64, so the tolerance is float32 round-off.
    eager, opt = jamba(2), optimized(jamba(2), 5)
    assert_gradients_match(eager, opt, [ids_for(13, 3)], call=logits_of, rtol=1e-5)
    by_pass = {}
    for r in opt.report.rewrites:
        by_pass.setdefault(r.pass_name, []).append(r.site.split(" ")[0])
    assert by_pass[PASS] == ["model.layers.1", "model.layers.3"], opt.report
    assert by_pass["adjoint_sharded_blocks"] == ["model.layers.0", "model.layers.2"], opt.report
    assert not opt.report.refusals
