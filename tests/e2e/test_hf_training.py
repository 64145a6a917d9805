"""The training tools people use, end to end on a tiny float64 Llama with ``aot_eager``:
Hugging Face ``Trainer`` (gradient accumulation, ``use_cache=False``, checkpoints), TRL's
``SFTTrainer``, PEFT LoRA in both orders, ``generate``, and copies of an optimized model.

Exactness is stated in float64 against the same run without us. One caveat, from
``transformers``: its causal-LM loss casts the logits to float32 even in a float64 model,
while the tiled LM loss keeps float64 (more precise). The eager references therefore use
:func:`float64_causal_lm_loss` (transformers' loss without that cast); gradients and trained
parameters are then equal to float64 round-off, and the returned loss (float32, as
transformers returns it) to float32 round-off.
"""

import copy
import inspect
import json
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

import longctx_compiler as lc
from longctx_compiler.api import BypassWarning
from longctx_compiler.testing import EXACT_RTOL, relative_error

transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

VOCAB = 96
T = 16
LAYERS = 1
#: float32 round-off of a loss (transformers returns the loss in float32)
LOSS_RTOL = 1e-6


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, attn_implementation="sdpa",
    )
    return transformers.LlamaForCausalLM(cfg).double()


def config():
    return lc.Config(backend="aot_eager", attention={"chunk_size": 8, "offload": False}, lm_loss={"chunk_size": 8})


def float64_causal_lm_loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs):
    """transformers' ``ForCausalLMLoss`` without its ``logits.float()``: the cross-entropy of
    the float64 logits, returned in float32 and divided by ``num_items_in_batch`` there, as
    transformers does (so the ``1 / num_items`` that scales every gradient is the same
    float32 number as in the rewritten graph)."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = F.cross_entropy(logits.reshape(-1, vocab_size), shift_labels.reshape(-1), ignore_index=ignore_index, reduction=reduction)
    loss = loss.float()
    return loss / num_items_in_batch if reduction == "sum" else loss


def eager_llama(seed=0):
    model = tiny_llama(seed)
    model.loss_function = float64_causal_lm_loss
    return model


def token_ids(rows=8, seed=0):
    return torch.randint(2, VOCAB, (rows, T), generator=torch.Generator().manual_seed(seed))


def lm_dataset():
    ids = token_ids().tolist()
    # "text" is not a forward argument: Trainer must drop it by reading the forward signature
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": ids, "text": ["unused"] * len(ids)})


def training_args(out, **kw):
    base = dict(
        output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
        learning_rate=1e-2, report_to=[], use_cpu=True, dataloader_num_workers=0, logging_steps=1, seed=0,
        save_strategy="no",
    )
    base.update(kw)
    return base


def logged_losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def assert_parameters_equal(model, reference):
    a, b = dict(model.named_parameters()), dict(reference.named_parameters())
    assert a.keys() == b.keys()
    worst = max((relative_error(a[n], b[n]), n) for n in a)
    assert worst[0] <= EXACT_RTOL, f"{worst[1]}: relative error {worst[0]:.2e}"


def assert_losses_equal(losses, reference):
    assert len(losses) == len(reference) > 0
    for ours, theirs in zip(losses, reference):
        assert abs(ours - theirs) <= LOSS_RTOL * abs(theirs), (losses, reference)


def assert_rewrites_fired(report, *, lm_loss=True):
    # One chunked attention per layer once the causal mask transformers builds with
    # use_cache=False is proven; the LM head + loss once.
    assert report.count("chunked_attention") == LAYERS, str(report)
    if lm_loss:
        assert report.count("tiled_lm_loss") == 1, str(report)


# -- HF Trainer ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def eager_trainer_run(tmp_path_factory):
    """Plain Trainer, same seed and data: the losses and final parameters to match."""
    model = eager_llama()
    trainer = transformers.Trainer(model=model, args=transformers.TrainingArguments(**training_args(tmp_path_factory.mktemp("eager"))), train_dataset=lm_dataset())
    trainer.train()
    return logged_losses(trainer), model


@pytest.mark.parametrize("form", ["wrapper", "inplace"])
def test_trainer_matches_eager_with_accumulation_and_checkpoints(form, tmp_path, eager_trainer_run):
    eager_losses, eager_model = eager_trainer_run
    original = tiny_llama()
    model = lc.optimize(original, config=config(), inplace=(form == "inplace"))
    assert inspect.signature(model.forward) == inspect.signature(original.forward)
    args = transformers.TrainingArguments(**training_args(tmp_path, save_strategy="steps", save_steps=2))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=lm_dataset())
    # what every training setup runs with: Trainer turns the KV cache off
    assert original.config.use_cache is False
    trainer.train()

    assert_losses_equal(logged_losses(trainer), eager_losses)
    assert_parameters_equal(original, eager_model)
    report = model.report if form == "wrapper" else model.longctx.report
    assert_rewrites_fired(report)

    # the checkpoint is a Hugging Face one: config.json, weights under the original names
    ckpt = tmp_path / "checkpoint-2"
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    from safetensors.torch import load_file

    weights = load_file(str(ckpt / "model.safetensors"))
    assert set(weights) <= set(original.state_dict()) and "model.layers.0.self_attn.q_proj.weight" in weights
    reloaded = transformers.LlamaForCausalLM.from_pretrained(str(ckpt))
    assert_parameters_equal(reloaded, original)
    assert type(reloaded) is transformers.LlamaForCausalLM

    # ... and loads back into an optimized model, through Trainer's own resume path
    fresh_original = tiny_llama(seed=1)
    fresh = lc.optimize(fresh_original, config=config(), inplace=(form == "inplace"))
    resumed = transformers.Trainer(model=fresh, args=args, train_dataset=lm_dataset())
    resumed._load_from_checkpoint(str(ckpt))
    assert_parameters_equal(fresh_original, original)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    original = tiny_llama()
    wrapper = lc.optimize(original, config=config())
    wrapper.save_pretrained(str(tmp_path / "w"))
    back = lc.optimize(transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "w")), config=config())
    assert list(back.state_dict()) == list(original.state_dict())
    assert_parameters_equal(back.original, original)
    inplace = lc.optimize(tiny_llama(), config=config(), inplace=True)
    inplace.save_pretrained(str(tmp_path / "i"))
    assert "longctx" not in (tmp_path / "i" / "config.json").read_text()
    assert_parameters_equal(transformers.LlamaForCausalLM.from_pretrained(str(tmp_path / "i")), inplace)


# -- TRL ------------------------------------------------------------------------------------


def word_tokenizer():
    """A word-level tokenizer built in memory (no download): ``t0`` ... ``t95``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1")


def sft_run(model, out):
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(**training_args(out), bf16=False)
    trainer = trl.SFTTrainer(
        model=model, args=args, processing_class=word_tokenizer(),
        train_dataset=datasets.Dataset.from_dict({"input_ids": token_ids().tolist()}),
    )
    trainer.train()
    return logged_losses(trainer)


def test_sft_trainer_goes_through_the_compiler_in_place(tmp_path):
    # SFTTrainer replaces model.forward with a fused LM head that calls the backbone directly;
    # compiled in place, model(...) is what is compiled, so that forward is traced too.
    eager = tiny_llama()
    eager_losses = sft_run(eager, tmp_path / "eager")
    model = lc.optimize(tiny_llama(), config=config(), inplace=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BypassWarning)
        losses = sft_run(model, tmp_path / "ours")
    assert_losses_equal(losses, eager_losses)
    assert_parameters_equal(model, eager)
    # Our passes saw TRL's forward: every layer's attention is in the report (it was empty
    # when TRL bypassed us). TRL's collator always hands the model an attention mask (or,
    # padding-free, position_ids), so the rewrite fires once the chunked attention takes a
    # padding mask; until then the refusal must name that mask. TRL's fused head computes
    # the loss itself (already tiled), so there is no LM loss for us to rewrite.
    report = model.longctx.report
    assert model.longctx.compile_count >= 1
    refused = [r for r in report.refusals if r.pass_name == "chunked_attention"]
    assert report.count("chunked_attention") + len(refused) == LAYERS, str(report)
    assert all("attention_mask" in r.reason or "padding" in r.reason for r in refused), str(report)


def test_sft_trainer_bypassing_the_wrapper_warns(tmp_path):
    model = lc.optimize(tiny_llama(), config=config())
    with pytest.warns(BypassWarning, match="did not go through the compiler.*_fused_forward.*from trl.*inplace=True"):
        sft_run(model, tmp_path)
    assert model.compile_count == 0


# -- PEFT -----------------------------------------------------------------------------------


def lora(model):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    torch.manual_seed(7)  # the adapters' random initialisation
    return peft.get_peft_model(model, cfg)


def lora_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids, use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    return out.loss.detach(), grads


@pytest.mark.parametrize("order", ["lora_then_optimize", "optimize_in_place_then_lora", "optimize_then_lora"])
def test_lora_gradients_exact_and_rewrites_fire(order):
    reference = lora(eager_llama())
    if order == "lora_then_optimize":
        model = lc.optimize(lora(tiny_llama()), config=config())
        report = lambda: model.report  # noqa: E731
    elif order == "optimize_in_place_then_lora":
        base = lc.optimize(tiny_llama(), config=config(), inplace=True)
        model = lora(base)
        report = lambda: base.longctx.report  # noqa: E731
    else:
        wrapper = lc.optimize(tiny_llama(), config=config())
        model = lora(wrapper)
        report = lambda: wrapper.report  # noqa: E731
    ids = token_ids(rows=2, seed=3)
    (loss, grads), (ref_loss, ref_grads) = lora_grads(model, ids), lora_grads(reference, ids)
    assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * abs(ref_loss.item())
    assert grads.keys() == ref_grads.keys()
    worst = max((relative_error(grads[n], ref_grads[n]), n) for n in grads)
    assert worst[0] <= EXACT_RTOL, f"{worst[1]}: relative error {worst[0]:.2e}"
    assert_rewrites_fired(report())


# -- generate, copies -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["wrapper", "inplace"])
def test_generate_same_tokens_and_no_compile_per_token(form):
    reference = tiny_llama()
    model = lc.optimize(tiny_llama(), config=config(), inplace=(form == "inplace"))
    counter = (lambda: model.compile_count) if form == "wrapper" else (lambda: model.longctx.compile_count)
    ids = token_ids(rows=2, seed=4)
    model.train()
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()  # a training step compiles
    compiled = counter()
    assert compiled >= 1
    model.eval()
    prompt = ids[:, :6]
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    # generate decodes with a KV cache: those calls run the model eagerly, none compiles
    torch.testing.assert_close(model.generate(prompt, **kwargs), reference.generate(prompt, **kwargs), rtol=0, atol=0)
    assert counter() == compiled


@pytest.mark.parametrize("form, copier", [("wrapper", copy.deepcopy), ("inplace", lambda m: pickle.loads(pickle.dumps(m)))], ids=["wrapper-deepcopy", "inplace-pickle"])
def test_state_dict_and_copies_of_an_optimized_llama(form, copier):
    # (both copies of both forms are covered on a small model in test_api.py; here each form
    # once on a real model, since each copy compiles again)
    reference = eager_llama()
    model = lc.optimize(tiny_llama(seed=1), config=config(), inplace=(form == "inplace"))
    model.load_state_dict(reference.state_dict())
    assert list(model.state_dict()) == list(reference.state_dict())
    ids = token_ids(rows=2, seed=5)

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        out = m(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.detach(), [p.grad.clone() for p in m.parameters()]

    ref_loss, ref_grads = loss_and_grads(reference)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BypassWarning)
        for clone in (model, copier(model)):
            loss, grads = loss_and_grads(clone)
            assert abs(loss.item() - ref_loss.item()) <= LOSS_RTOL * abs(ref_loss.item())
            assert max(relative_error(g, r) for g, r in zip(grads, ref_grads)) <= EXACT_RTOL
            report = clone.report if form == "wrapper" else clone.longctx.report
            assert report.count("tiled_lm_loss") == 1
            assert clone is model or all(p is not q for p, q in zip(clone.parameters(), model.parameters()))
