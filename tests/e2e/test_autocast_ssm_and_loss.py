"""bf16 mixed precision end to end (issue 9, item 4): Hugging Face Trainer's ``bf16=True`` runs
the forward under ``torch.autocast(device, dtype=torch.bfloat16)``; a model cast with
``model.to(torch.bfloat16)`` runs in bfloat16 throughout. For a tiny Llama (LM loss), a tiny
Hugging Face Mamba and a ``TinyMambaLM`` (scans, depthwise convolutions, blocks, LM loss) the
rewrites fire and the rewritten model is exact up to the dtype rule: its error against a float64
copy is at most 2x plain PyTorch's own error in that precision, for the loss and every gradient.

Autocast's casts are taken as the original ops take them: the LM head's ``linear`` runs in
bfloat16 on float32 operands (explicit casts in the rewritten graph) and the loss accumulates in
float32 (``cross_entropy`` is on autocast's float32 list); the scans compute in float32 from
bfloat16 activations; the depthwise convolution's operands are cast as autocast casts
``conv1d`` and its taps accumulate in float32. Where the rewrite computes more precisely than the
original (transformers' scan rounds its state to bfloat16 for the readout) the report says so.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import longctx_compiler as lc
from longctx_compiler.backend import PassFailureWarning, RefusalWarning
from longctx_compiler.nn import TinyMambaLM
from longctx_compiler.testing import assert_gradients_match

transformers = pytest.importorskip("transformers")

VOCAB = 64
LENGTHS = (29, 13)  # two lengths: one compiled graph serves both


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
    )
    return transformers.LlamaForCausalLM(cfg)


def hf_mamba():
    cfg = transformers.MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=VOCAB, use_associative_scan=False)
    return transformers.MambaForCausalLM(cfg)


def tiny_mamba():
    return TinyMambaLM(vocab_size=VOCAB, d_model=16, n_layers=2, d_state=4)


MODELS = {"llama": llama, "hf_mamba": hf_mamba, "tiny_mamba": tiny_mamba}


def expected(name: str, shard_blocks: bool) -> dict[str, int]:
    """The rewrites that must fire (pass -> count) for a two-layer model."""
    if name == "llama":
        return {"tiled_lm_loss": 1}
    blocks = "adjoint_sharded_blocks" if shard_blocks else "recompute_ssm_blocks"
    return {"adjoint_sharded_scan": 2, "depthwise_conv": 2, blocks: 2, "tiled_lm_loss": 1}


def three(name: str, dtype: torch.dtype):
    """(float64 reference, plain PyTorch baseline, candidate) with the same parameters; the
    baseline and candidate in ``dtype`` (float32 for autocast, bfloat16 for a bf16 model)."""
    torch.manual_seed(0)
    base = MODELS[name]().to(dtype)
    return copy.deepcopy(base).double(), base, copy.deepcopy(base)


def labels_for(ids):
    labels = ids.clone()
    labels[0, :3] = -100  # prompt masking, as a fine-tuning batch has
    return labels


def autocast_call(model, ids):
    # What accelerate does for Trainer(bf16=True): the forward under autocast, backward outside.
    # (A float64 reference is never autocast: autocast leaves float64 tensors alone.)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return model(ids, labels=labels_for(ids))


def plain_call(model, ids):
    return model(ids, labels=labels_for(ids))


def optimized(model, shard_blocks=True):
    # The attention rewrite is left out: these tests are about the LM loss and the SSM passes
    # (attention's own precision tests live with it).
    return lc.optimize(
        model, backend="aot_eager", strict=True, attention={"enabled": False},
        ssm={"chunk_size": 8, "block_chunk_size": 8, "shard_blocks": shard_blocks}, lm_loss={"chunk_size": 8},
    )


def check(name, dtype, call, shard_blocks=True):
    reference, baseline, cand = three(name, dtype)
    opt = optimized(cand, shard_blocks)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for t in LENGTHS:
            ids = torch.randint(0, VOCAB, (2, t), generator=torch.Generator().manual_seed(t))
            assert_gradients_match(reference, opt, [ids], loss_fn=lambda out: out.loss, baseline=baseline, call=call)
    ours = [w for w in caught if issubclass(w.category, (RefusalWarning, PassFailureWarning))]
    assert not ours, [str(w.message) for w in ours]  # no fallback, no refusal on the way
    report = opt.report
    for pass_name, n in expected(name, shard_blocks).items():
        assert report.count(pass_name) == n, (pass_name, str(report))
    assert not report.fallbacks and opt.compile_count == 1
    return report


@pytest.mark.parametrize(
    "name, shard_blocks",
    [
        pytest.param("llama", True, id="llama"),
        pytest.param("hf_mamba", False, id="hf_mamba-recompute"),
        pytest.param("tiny_mamba", False, id="tiny_mamba-recompute"),
        pytest.param("hf_mamba", True, id="hf_mamba-blocks"),
        pytest.param("tiny_mamba", True, id="tiny_mamba-blocks"),
    ],
)
def test_bf16_autocast_training_is_rewritten_within_the_dtype_rule(name, shard_blocks):
    report = check(name, torch.float32, autocast_call, shard_blocks)
    loss = next(r for r in report.rewrites if r.pass_name == "tiled_lm_loss")
    # The head ran in bfloat16 on float32 parameters: the op got the same casts.
    assert "bfloat16" in loss.details["autocast"]
    if name == "hf_mamba":
        # transformers' scan rounds its state to bfloat16 for the readout (and Δ, silu(z)): the
        # op computes those in float32, and the report says so at each site.
        for r in (r for r in report.rewrites if r.pass_name == "adjoint_sharded_scan"):
            assert r.details["precision"].startswith("computes in float32 where transformers' mamba_selective_scan"), r.details
            assert "rounds the state to bfloat16 for the readout" in r.details["precision"]
        assert "rounds the state to bfloat16 for the readout" in str(report)
    if name != "llama":
        conv = next(r for r in report.rewrites if r.pass_name == "depthwise_conv")
        assert "bfloat16" in conv.details["autocast"] and "float32" in conv.details["accumulation"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bf16_models_are_rewritten_within_the_dtype_rule(name):
    report = check(name, torch.bfloat16, plain_call)
    if name == "tiny_mamba":
        # TinyMambaLM computes cross_entropy on its bfloat16 logits; the op accumulates in float32.
        loss = next(r for r in report.rewrites if r.pass_name == "tiled_lm_loss")
        assert loss.details["precision"] == "computes in float32 where the original computed cross_entropy in bfloat16"


def test_autocast_leaves_no_fallback_and_no_fake_tensor_noise(caplog):
    # Before: the Mamba graph fell back with a RuntimeError warning and pages of fake-tensor
    # errors on the log; then the block pass failed (its body ran without the autocast state it
    # was traced in). Now, with the default passes, it is rewritten, silently, strict=False too.
    torch.manual_seed(0)
    opt = lc.optimize(hf_mamba(), backend="aot_eager", ssm={"chunk_size": 8})
    ids = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        autocast_call(opt, ids).loss.backward()
    assert not [w for w in caught if issubclass(w.category, (RefusalWarning, PassFailureWarning))]
    assert not opt.report.fallbacks and opt.report.count("adjoint_sharded_scan") == 2
    assert opt.report.count("adjoint_sharded_blocks") == 2
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
