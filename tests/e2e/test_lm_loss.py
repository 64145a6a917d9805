"""Tiled LM head + cross-entropy on Hugging Face Llama and Mamba: float64 gradients, the
rewrite fires once, one compile for many lengths, and the ``[T, V]`` float32 tensors leave
the saved-for-backward set."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for, loss_of
from longctx_compiler.memory import measure_step
from longctx_compiler.testing import EXACT_RTOL, GRADIENT_FLOOR, assert_gradients_match, relative_error

transformers = pytest.importorskip("transformers")

PASS = "tiled_lm_loss"
KIND = "linear+cross_entropy -> linear_cross_entropy"
VOCAB = 64


def llama(vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg).to(torch.float64)


def mamba(vocab=VOCAB, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=vocab, use_associative_scan=False)
    return transformers.MambaForCausalLM(cfg).to(torch.float64)


def optimized(model, **lm_loss):
    return lc.optimize(
        model, backend="aot_eager", strict=True, attention={"chunk_size": 8, "offload": False},
        ssm={"chunk_size": 8}, lm_loss={"chunk_size": 8, **lm_loss},
    )


def labels_for(ids):
    # Some ignored positions (prompt masking), as a fine-tuning batch has.
    labels = ids.clone()
    labels[0, :3] = -100
    return labels


def call(model, ids):
    return model(ids, labels=labels_for(ids))


def grads(loss, model):
    params = dict(model.named_parameters())
    return {"loss": loss.detach(), **dict(zip(params, (g.detach() for g in torch.autograd.grad(loss, list(params.values())))))}


def exact_float64_loss(model, ids):
    """transformers' causal-LM loss without its `.float()`: what a float64 model means."""
    logits = model(ids).logits
    shift = F.pad(labels_for(ids), (0, 1), value=-100)[..., 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), shift.reshape(-1))


def test_llama_float64_gradients_exact_and_equal_to_eager():
    # transformers computes the loss after `logits.float()`, which rounds a float64 model's
    # logits down to float32; the op stays in float64. So: every gradient equals a float64
    # loss exactly, the loss (returned in float32, as the original) to float32 round-off, and
    # both equal eager to the float32 round-off of eager's own loss.
    eager, opt = llama(), optimized(llama())

    @settings(max_examples=5, deadline=None)
    @given(t=st.integers(4, 40), seed=st.integers(0, 2**16))
    def prop(t, seed):
        ids = ids_for(t, seed)
        ours = grads(call(opt, ids).loss, opt)
        exact = grads(exact_float64_loss(eager, ids), eager)
        floor = GRADIENT_FLOOR * max(v.norm().item() for k, v in exact.items() if k != "loss")
        assert ours["loss"].dtype == torch.float32
        assert relative_error(ours["loss"], exact["loss"]) <= torch.finfo(torch.float32).eps
        worst = max((relative_error(ours[k], exact[k], scale=floor), k) for k in exact if k != "loss")
        assert worst[0] <= EXACT_RTOL, worst
        assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=call, rtol=1e-5)
        assert opt.report.count(PASS) == 1 and opt.report.count("chunked_attention") == 2

    prop()
    # Lengths below, above and not a multiple of the tile share one graph.
    assert opt.compile_count == 1
    (rw,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    # transformers returns the logits too; in training they are None (Liger's convention):
    # the head's [T, vocab] matmul is gone, the op computes each tile's logits itself.
    assert rw.kind == KIND and not rw.details["logits_kept"] and rw.site.startswith("lm_head")
    assert "None" in rw.details["logits"] and "None" in str(opt.report)
    assert rw.details["vocab"] == VOCAB and rw.details["chunk_size"] == 8
    ids = ids_for(11, 0)
    assert call(opt, ids).logits is None
    # Evaluation (no gradient) gets its logits and the same loss as eager.
    with torch.no_grad():
        want, got = call(eager, ids), call(opt, ids)
    torch.testing.assert_close(got.logits, want.logits, rtol=EXACT_RTOL, atol=0)
    torch.testing.assert_close(got.loss, want.loss)


def test_return_logits_keeps_them_in_training():
    eager, opt = llama(), optimized(llama(), return_logits=True)
    ids = ids_for(13, 1)
    assert_gradients_match(eager, opt, [ids], loss_fn=lambda out: out.loss + out.logits.sum() * 1e-3, call=call, rtol=1e-5)
    (rw,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert rw.details["logits_kept"] and rw.kind.endswith("(logits kept)") and "logits" not in rw.details


def test_mamba_float64_loss_and_every_gradient_match_eager():
    # transformers' Mamba computes its scan partly in float32 (and its loss after `.float()`);
    # the rewrites stay in float64, so the tolerance is float32 round-off.
    eager, opt = mamba(), optimized(mamba())
    for t, seed in ((12, 0), (29, 1)):
        ids = ids_for(t, seed)
        report = assert_gradients_match(eager, opt, [ids], loss_fn=loss_of, call=call, rtol=1e-5)
        assert report.errors["loss"][0] <= 1e-5
        assert opt.report.count(PASS) == 1
    assert opt.compile_count == 1
    (rw,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert rw.kind == KIND and rw.site.startswith("lm_head") and "None" in rw.details["logits"]


@pytest.mark.parametrize("make", [llama, mamba], ids=["llama", "mamba"])
def test_saved_for_backward_drops_by_the_float32_logits(make):
    # Plain autograd keeps cross-entropy's [B·T, V] float32 log-softmax for backward; the op
    # keeps the per-token log-sum-exp [B·T] (float64 here) instead.
    B, T, V = 2, 48, 512
    ids = ids_for(T, 0, batch=B, vocab=V)
    saved = {}
    for enabled in (True, False):
        model = make(vocab=V)
        opt = optimized(model, enabled=enabled)
        step = lambda: call(opt, ids).loss.backward()  # noqa: E731
        step()  # compile outside the measurement
        model.zero_grad(set_to_none=True)
        saved[enabled] = measure_step(step, device="cpu", parameters=model).saved_for_backward_bytes
        assert opt.report.count(PASS) == (1 if enabled else 0)
    logits_f32 = B * T * V * 4
    drop = saved[False] - saved[True]
    assert abs(drop - logits_f32) <= 0.02 * logits_f32, (drop, logits_f32)


_TRANSFORMING_HEADS = {
    # (model, what the pass folds into the op)
    "granite": (lambda c: transformers.GraniteForCausalLM(transformers.GraniteConfig(logits_scaling=4.0, **c)), {"logit_scale": 0.25}),
    "cohere": (lambda c: transformers.CohereForCausalLM(transformers.CohereConfig(logit_scale=0.125, pad_token_id=0, bos_token_id=1, eos_token_id=2, **c)),
               {"logit_scale": 0.125}),
    "gemma2": (lambda c: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(final_logit_softcapping=3.0, head_dim=8, **c)), {"softcap": 3.0}),
}


@pytest.mark.parametrize("name", sorted(_TRANSFORMING_HEADS))
def test_heads_that_scale_or_softcap_their_logits_are_tiled_exactly(name):
    # Before: refused ("`truediv` between the LM head and the loss"). Now the scale or the
    # soft-capping runs inside the op, per tile; float64 gradients equal eager's to the
    # float32 round-off of transformers' `.float()` (the op stays in float64, and says so).
    make, folded = _TRANSFORMING_HEADS[name]
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=128)
    torch.manual_seed(0)
    eager = make(cfg).double()
    opt = optimized(make(cfg).double())
    opt.load_state_dict(eager.state_dict())
    for t, seed in ((13, 0), (6, 1)):
        report = assert_gradients_match(eager, opt, [ids_for(t, seed)], loss_fn=loss_of, call=call, rtol=1e-5)
        assert report.errors["loss"][0] <= 1e-5
    rewrites = [r for r in opt.report.rewrites if r.pass_name == PASS]
    # (Gemma 2 compiles once per length here; the others once for both.)
    assert rewrites and all({k: rw.details[k] for k in folded} == folded for rw in rewrites)
