"""Chunked attention under ``torch.autocast`` (bf16) on a tiny Hugging Face Llama.

Under autocast Llama's q/k come out of RoPE in float32 while v stays bfloat16; SDPA (on
autocast's lower-precision list) and the eager spelling's matmuls cast all three to bf16.
The pass used to refuse every layer ("mixed dtypes"); the op now casts as SDPA does (its
Autocast kernel) and accumulates in fp32. Judged by the project's dtype rule: loss and every
gradient within twice plain PyTorch's own bf16-autocast error against a float64 reference.
"""

import pytest
import torch

import longctx_compiler as lc
from lm_helpers import ids_for, loss_of
from longctx_compiler.testing import assert_gradients_match

transformers = pytest.importorskip("transformers")

LAYERS = 2


def llama(attn, dtype, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def bf16_call(model, ids):
    # The float64 reference runs through this too: autocast leaves float64 alone.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(ids, labels=ids)


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bf16_autocast_is_rewritten_within_twice_plain_pytorch_error(attn, offload):
    reference, baseline = llama(attn, torch.float64), llama(attn, torch.float32)
    # The tiled LM loss has its own autocast handling; attention alone is judged here.
    candidate = lc.optimize(llama(attn, torch.float32), backend="aot_eager", strict=True, lm_loss={"enabled": False},
                            attention={"chunk_size": 8, "offload": offload})
    for t, seed in ((33, 1), (20, 2)):
        ids = ids_for(t, seed)
        assert_gradients_match(reference, candidate, [ids], loss_fn=loss_of, call=bf16_call, baseline=baseline)
    report = candidate.report
    assert report.count("chunked_attention") == LAYERS, report
    assert not report.refusals, report
    assert all(r.details["autocast"] == "bfloat16" for r in report.rewrites)
    assert candidate.compile_count == 1


def test_outside_autocast_the_same_model_still_runs_in_float32():
    # Dynamo guards on the autocast state: leaving the region recompiles, without casts.
    model = lc.optimize(llama("sdpa", torch.float32), backend="aot_eager", strict=True, lm_loss={"enabled": False},
                        attention={"chunk_size": 8, "offload": False})
    eager = llama("sdpa", torch.float32)
    ids = ids_for(17, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(ids, labels=ids)
    assert [r.details["autocast"] for r in model.report.rewrites] == ["bfloat16"] * LAYERS
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.loss, eager(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)
    assert [r.details["autocast"] for r in model.report.rewrites] == [None] * LAYERS
