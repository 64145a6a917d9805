"""The causal masks transformers builds in real training setups, end to end.

HF ``Trainer``, TRL and gradient checkpointing call the model with ``use_cache=False``; then
transformers 5.x builds its mask through packed-sequence detection (``diff``/``cumsum`` over
the positions, index gathers, ``new_ones``). The chunked-attention rewrite must fire on every
layer there and be exact (float64). A padded batch (``attention_mask`` with zeros) attends
to its real keys only; positions passed by the caller (packed documents) give each document
its own causal attention.

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
        return model(ids, labels=extra.get("labels", ids), use_cache=extra.get("use_cache", False),
                     **{k: v for k, v in extra.items() if k not in ("labels", "use_cache")})

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


def _padded(t, seed, side="right"):
    """A batch of two rows padded to ``t`` (two real lengths), labels -100 at the pads."""
    ids = ids_for(t, seed)
    mask = torch.ones(2, t, dtype=torch.long)
    if side == "right":
        mask[0, t - 4 :] = 0
        mask[1, t - 1 :] = 0
    elif side == "left":
        mask[0, :3] = 0
        mask[1, :1] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.parametrize("attn, use_cache", [("sdpa", False), ("eager", False), ("sdpa", True)])
@pytest.mark.parametrize("side", ["right", "none"])
def test_padded_batch_is_rewritten_on_every_layer_and_exact(attn, side, use_cache):
    # use_cache=True (the config default, what a hand-written loop gets): transformers sizes the
    # mask by the KV cache's key length, which equals the inputs' because the lengths are
    # compared when the call is traced (one size symbol for equal lengths).
    eager, opt = llama(attn), optimized(llama(attn))
    for t, seed in ((14, 2), (19, 3)):
        ids, mask, labels = _padded(t, seed, side)
        call = training_call(attention_mask=mask, labels=labels, use_cache=use_cache)
        assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=call, rtol=RTOL[attn])
    rewrites = [r for r in opt.report.rewrites if r.pass_name == "chunked_attention"]
    assert len(rewrites) == LAYERS and all(r.details["key_padding"] for r in rewrites)
    assert opt.compile_count == 1


def test_left_padding_with_sdpa_is_exact():
    # Padded queries before the first real token see no key: SDPA gives them 0, as the op does.
    eager, opt = llama("sdpa"), optimized(llama("sdpa"))
    ids, mask, labels = _padded(13, 4, "left")
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=training_call(attention_mask=mask, labels=labels),
                           rtol=RTOL["sdpa"])
    assert opt.report.count("chunked_attention") == LAYERS


def test_left_padding_with_the_eager_spelling_is_a_clear_error():
    # transformers' eager attention gives a row without keys an average of every key (nan in
    # a float64 model: finfo.min becomes -inf in its float32 softmax); the op would give 0.
    # Right padding never has such rows; left padding stops with the reason, never silently.
    opt = optimized(llama("eager"))
    ids, mask, labels = _padded(13, 4, "left")
    with pytest.raises(RuntimeError, match="sees no key"):
        training_call(attention_mask=mask, labels=labels)(opt, ids)


def _packed(lengths_per_row):
    """position_ids restarting at every document (transformers' packed-sequence convention)."""
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row])


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_are_rewritten_on_every_layer_and_exact(attn):
    # Caller positions that restart: transformers keeps each document to itself, and so must we.
    eager, opt = llama(attn), optimized(llama(attn))
    for rows, seed in (([[6, 7], [13]], 3), ([[5, 1, 9, 6], [2, 8, 11]], 4)):
        positions = _packed(rows)
        ids = ids_for(positions.shape[1], seed)
        assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=training_call(position_ids=positions), rtol=RTOL[attn])
    assert opt.report.count("chunked_attention") == LAYERS
    assert all(r.details["documents"] for r in opt.report.rewrites if r.pass_name == "chunked_attention")
    assert opt.compile_count == 1


def test_packed_documents_equal_each_document_run_alone():
    # The promise of packing: one row of documents trains exactly as the documents one by one.
    torch.manual_seed(5)
    opt, alone = optimized(llama("sdpa")), llama("sdpa")
    alone.load_state_dict(opt.state_dict())
    lengths = [5, 1, 11, 7]
    positions = _packed([lengths])
    ids = ids_for(sum(lengths), 6, batch=1)
    weights = torch.randn(1, sum(lengths), 64, dtype=torch.float64)
    packed_logits = opt(ids, position_ids=positions, use_cache=False).logits
    (packed_logits * weights).sum().backward()
    start, pieces = 0, []
    for n in lengths:
        logits = alone(ids[:, start : start + n], use_cache=False).logits
        (logits * weights[:, start : start + n]).sum().backward()
        pieces.append(logits)
        start += n
    torch.testing.assert_close(packed_logits, torch.cat(pieces, 1), rtol=EXACT_RTOL, atol=1e-12)
    grads = dict(alone.named_parameters())
    for name, p in opt.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=EXACT_RTOL, atol=1e-12, msg=name)
    assert opt.report.count("chunked_attention") == LAYERS


def test_use_cache_true_spelling_still_rewritten():
    # The KV-cache spelling (what generate and plain forward calls use) keeps its proof.
    eager, opt = llama("eager"), optimized(llama("eager"))
    ids = ids_for(11, 4)
    assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=lambda m, x: m(x, labels=x, use_cache=True), rtol=RTOL["eager"])
    assert opt.report.count("chunked_attention") == LAYERS


@pytest.mark.parametrize("attn, case", [("sdpa", "packed"), ("eager", "packed"), ("sdpa", "right"), ("sdpa", "left")])
def test_packed_and_padded_batches_are_pipelined_chunk_by_chunk_and_exact(attn, case):
    # The K/V history keeps its keys' ids: each layer chunk attends to the earlier chunks'
    # keys of its own document (documents cross the chunks of 5), or to the real ones.
    eager = llama(attn)
    opt = lc.optimize(llama(attn), backend="aot_eager", strict=True, lm_loss={"enabled": False},
                      attention={"chunk_size": 4, "offload": False}, layers={"enabled": True, "chunk_size": 5})
    for t, seed in ((16, 7), (23, 8)):
        ids = ids_for(t, seed)
        if case == "packed":
            call = training_call(position_ids=_packed([[9, t - 9], [3, 1, t - 4]]))
        else:
            ids, mask, labels = _padded(t, seed, case)
            call = training_call(attention_mask=mask, labels=labels)
        assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=call, rtol=RTOL[attn])
    assert opt.report.count("pipelined_layers") == LAYERS, opt.report
    assert opt.compile_count == 1


def test_padding_with_the_eager_spelling_keeps_its_layers_whole_with_the_reason():
    # Its run-time check that every query sees a key reads whole rows of ids: not chunked.
    opt = lc.optimize(llama("eager"), backend="aot_eager", lm_loss={"enabled": False},
                      attention={"chunk_size": 4, "offload": False}, layers={"enabled": True, "chunk_size": 5})
    ids, mask, labels = _padded(13, 4, "right")
    training_call(attention_mask=mask, labels=labels)(opt, ids)
    refused = [r for r in opt.report.refusals if r.pass_name == "pipelined_layers"]
    assert len(refused) == LAYERS and all("sees a key" in r.reason for r in refused)
    assert opt.report.count("chunked_attention") == LAYERS
