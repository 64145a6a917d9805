"""The causal masks transformers builds in real training setups, end to end.

HF ``Trainer``, TRL and gradient checkpointing call the model with ``use_cache=False``; then
transformers 5.x builds its mask through packed-sequence detection (``diff``/``cumsum`` over
the positions, index gathers, ``new_ones``). The chunked-attention rewrite must fire on every
layer there and be exact (float64). A padded batch (``attention_mask`` with zeros) or
positions passed by the caller (packed documents) cannot be proven causal: the report refuses
with a reason that names them, and the model still trains exactly as eager.

(Sites in reports are not asserted on here: their spelling is being cleaned up elsewhere.)
"""

import pytest
import torch

import longctx_compiler as lc
from lm_helpers import ids_for, loss_of
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match

transformers = pytest.importorskip("transformers")

LAYERS = 2


def llama(attn="sdpa", seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=512, attn_implementation=attn,
    )
    return transformers.LlamaForCausalLM(cfg).to(torch.float64).train()


def optimized(model):
    # Attention alone (the tiled LM loss has its own end-to-end tests in test_lm_loss.py).
    return lc.optimize(model, backend="aot_eager", strict=True, lm_loss={"enabled": False},
                       attention={"chunk_size": 8, "offload": False})


def training_call(**extra):
    """How Trainer/TRL call the model: no KV cache, labels given."""

    def call(model, ids):
        return model(ids, labels=extra.get("labels", ids), use_cache=False,
                     **{k: v for k, v in extra.items() if k != "labels"})

    return call


# float64 SDPA is exact; transformers' eager spelling computes its softmax in float32 even in
# a float64 model (ours stays in float64): the difference is the original's round-off.
RTOL = {"sdpa": EXACT_RTOL, "eager": 1e-5}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_use_cache_false_mask_is_proven_and_rewritten_on_every_layer(attn):
    eager, opt = llama(attn), optimized(llama(attn))
    for t, seed in ((12, 0), (21, 1)):
        ids = ids_for(t, seed)
        report = assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=training_call(), rtol=RTOL[attn])
        assert report.errors["loss"][0] <= RTOL[attn]
    # the rewrite fired on every layer, with the mask proven causal (not is_causal=True)
    assert opt.report.count("chunked_attention") == LAYERS
    assert all(r.details["causal"] for r in opt.report.rewrites)
    assert not [r for r in opt.report.refusals if r.pass_name == "chunked_attention"]
    assert opt.compile_count == 1  # one graph for every length


def _padded(t, seed, zeros=True):
    ids = ids_for(t, seed)
    mask = torch.ones(2, t, dtype=torch.long)
    if zeros:
        # Right padding, two lengths. (Left padding leaves query rows with every key masked:
        # transformers' eager spelling then gives NaN by itself, float64 finfo.min becoming
        # -inf in its float32 softmax; SDPA is finite there.)
        mask[0, t - 4 :] = 0
        mask[1, t - 1 :] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("zeros", [True, False], ids=["padded", "all-ones"])
def test_padded_batch_is_refused_naming_padding_and_stays_exact(attn, zeros):
    eager, opt = llama(attn), optimized(llama(attn))
    ids, mask, labels = _padded(14, 2, zeros=zeros)
    call = training_call(attention_mask=mask, labels=labels)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=call, rtol=RTOL[attn])
    refusals = [r for r in opt.report.refusals if r.pass_name == "chunked_attention"]
    rewritten = opt.report.count("chunked_attention")
    # Every layer is accounted for: rewritten (only possible where transformers dropped an
    # all-ones mask) or refused with a reason that says padding.
    assert rewritten + len(refusals) == LAYERS
    assert all("padding" in r.reason and "attention_mask" in r.reason for r in refusals)
    if zeros:
        assert rewritten == 0


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_caller_positions_are_refused_naming_position_ids_and_stay_exact(attn):
    # position_ids passed by the caller may restart (packed documents): not provable.
    eager, opt = llama(attn), optimized(llama(attn))
    ids = ids_for(13, 3)
    positions = torch.cat([torch.arange(6), torch.arange(7)])[None].expand(2, -1).clone()  # two documents
    call = training_call(position_ids=positions)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=call, rtol=RTOL[attn])
    refusals = [r for r in opt.report.refusals if r.pass_name == "chunked_attention"]
    assert opt.report.count("chunked_attention") == 0
    assert len(refusals) == LAYERS and all("position_ids" in r.reason for r in refusals)


def test_use_cache_true_spelling_still_rewritten():
    # The KV-cache spelling (what generate and plain forward calls use) keeps its proof.
    eager, opt = llama("eager"), optimized(llama("eager"))
    ids = ids_for(11, 4)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lambda m, x: m(x, labels=x, use_cache=True), rtol=RTOL["eager"])
    assert opt.report.count("chunked_attention") == LAYERS
