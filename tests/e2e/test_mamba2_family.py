"""Mamba-2 SSD scans end to end: every transformers model of the Mamba-2 family (Mamba2, Zamba2,
Bamba, FalconH1, GraniteMoeHybrid, NemotronH) calls ``mamba2_chunk_scan``; the call is captured
as one ``longctx::ssd_fwd`` node per Mamba-2 layer, planned with the model's chunk size, and
trains with the loss and every gradient of eager transformers.

Tolerances. transformers computes the scan in float32 inside a float64 model (``.float()`` of
x, B, C and Δ) and the LM loss from float32 logits; ours computes both in float64. So ours and
eager differ by eager's own float32 round-off, which each comparison measures: ``ref64`` is the
same eager model with the scan computed in float64 by the op's sequential spec
(``ssd_reference``, plain autograd) and the loss computed from its float64 logits. Every
quantity of ours must be at most twice eager's distance from ``ref64`` away from ``ref64`` (the
project's dtype rule), hence within three times that distance of eager (plus a few units of
its own dtype's round-off). (Ours cannot equal ``ref64`` to float64 round-off: the gated
RMSNorm after the scan casts its input to float32, which turns the last-bit differences of two
float64 scans into float32 ones.)
"""

import contextlib
import copy
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import longctx_compiler as lc
from lm_helpers import ids_for
from longctx_compiler.capture import captured_functions
from longctx_compiler.kernels.ssd import DEFAULT_CHUNK, ssd_reference
from longctx_compiler.testing import GRADIENT_FLOOR, relative_error

transformers = pytest.importorskip("transformers")

#: The models' chunk_size: T = 13 is not a multiple of it, T = 5 is below it.
CHUNK = 8
LENGTHS = (13, 5)
VOCAB = 64


def _configs():
    t = transformers
    mamba = dict(hidden_size=16, vocab_size=VOCAB, num_hidden_layers=2)
    attention = dict(num_attention_heads=2, num_key_value_heads=1, intermediate_size=32)
    # Mamba-2 mixers of 4 heads of 8 channels (expand 2 x hidden 16), 2 groups, state 4.
    hybrid = dict(mamba_n_heads=4, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4, mamba_expand=2, mamba_chunk_size=CHUNK)
    return {
        "mamba2": (t.Mamba2ForCausalLM, t.Mamba2Config(**mamba, state_size=4, num_heads=4, head_dim=8, n_groups=2, expand=2,
                                                       chunk_size=CHUNK)),
        "zamba2": (t.Zamba2ForCausalLM, t.Zamba2Config(**mamba, layers_block_type=["mamba", "hybrid"], mamba_d_state=4,
                                                       mamba_headdim=8, n_mamba_heads=4, mamba_ngroups=2, num_attention_heads=2,
                                                       num_key_value_heads=2, intermediate_size=32, chunk_size=CHUNK,
                                                       use_mamba_kernels=False)),
        "bamba": (t.BambaForCausalLM, t.BambaConfig(**mamba, **attention, **hybrid, attn_layer_indices=[1])),
        "falcon_h1": (t.FalconH1ForCausalLM, t.FalconH1Config(**mamba, **attention, **hybrid, mamba_d_ssm=32)),
        "granitemoehybrid": (t.GraniteMoeHybridForCausalLM, t.GraniteMoeHybridConfig(
            **mamba, **attention, **hybrid, layer_types=["mamba", "attention"], shared_intermediate_size=32, num_local_experts=2,
            # batched experts: grouped_mm has no float64 kernel, and the "eager" loop over the experts
            # hit breaks the graph (nonzero) and recompiles with the routing
            num_experts_per_tok=1, experts_implementation="batched_mm")),
        "nemotron_h": (t.NemotronHForCausalLM, t.NemotronHConfig(
            hidden_size=16, vocab_size=VOCAB, num_hidden_layers=2, layers_block_type=["linear_attention", "full_attention"],
            ssm_state_size=4, mamba_num_heads=4, mamba_head_dim=8, n_groups=2, expand=2, chunk_size=CHUNK, head_dim=8, **attention)),
    }


def build(family):
    cls, cfg = _configs()[family]
    torch.manual_seed(0)
    return cls(cfg).to(torch.float64).train()


def mamba2_layers(model):
    """The model's Mamba-2 mixers (the modules holding the SSM's A_log and dt_bias)."""
    return [m for m in model.modules() if isinstance(getattr(m, "A_log", None), torch.nn.Parameter) and hasattr(m, "dt_bias")]


def float64_chunk_scan(hidden_states, dt, A, B, C, chunk_size, D=None, dt_bias=None, initial_states=None, dt_softplus=False,
                       dt_limit=(0.0, math.inf), return_final_states=False, **kwargs):
    """transformers' ``mamba2_chunk_scan`` computed in float64 (the op's sequential spec)."""
    return ssd_reference(hidden_states, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                         initial_states=initial_states, return_final_states=return_final_states)


@contextlib.contextmanager
def scan_in_float64(model):
    module = sys.modules[type(model).__module__]
    original = module.mamba2_chunk_scan
    module.mamba2_chunk_scan = float64_chunk_scan
    try:
        yield
    finally:
        module.mamba2_chunk_scan = original


def step(model, ids, float64_loss=False):
    """``[loss, *parameter gradients]`` of one training step; with ``float64_loss`` the loss is
    taken from the LM head's output in its dtype (transformers' own loss casts the logits to
    float32, and Mamba2 and NemotronH cast them already in the head)."""
    model.zero_grad(set_to_none=True)
    if not float64_loss:
        loss = model(ids, labels=ids, use_cache=False).loss
    else:
        head = []
        hook = model.get_output_embeddings().register_forward_hook(lambda module, args, out: head.append(out))
        try:
            logits = model(ids, labels=ids, use_cache=False).logits
        finally:
            hook.remove()
        # The model's logits are the head's output scaled (FalconH1's lm_head_multiplier,
        # Granite's logits_scaling), at most rounded to float32.
        scale = getattr(getattr(model, "model", None), "lm_head_multiplier", 1.0) / getattr(model.config, "logits_scaling", 1.0)
        logits64 = head[0] * scale
        assert relative_error(logits, logits64) <= torch.finfo(logits.dtype).eps
        loss = F.cross_entropy(logits64[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    return [loss.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("family", list(_configs()))
def test_loss_and_every_gradient_match_eager(family):
    eager = build(family)
    opt = lc.optimize(copy.deepcopy(eager), backend="aot_eager", strict=True)
    names = ["loss"] + [n for n, _ in eager.named_parameters()]
    for t in LENGTHS:
        ids = ids_for(t, seed=t, vocab=VOCAB)
        base = step(eager, ids)
        with scan_in_float64(eager):
            ref64 = step(eager, ids, float64_loss=True)
        ours = step(opt, ids)
        # Gradients that are (nearly) zero are measured on the model's gradient scale (as
        # assert_gradients_match does); a few units of the value's own dtype are always allowed,
        # of float32 for A_log: every mixer takes A = -exp(A_log.float()), so its gradient is a
        # float32 computation in eager, ref64 and ours alike.
        grad_scale = GRADIENT_FLOOR * max(g.norm().item() for g in ref64[1:])
        for name, o, b, r in zip(names, ours, base, ref64):
            scale = 0.0 if name == "loss" else grad_scale
            eager_err = relative_error(b, r, scale=scale)
            floor = 4 * torch.finfo(torch.float32 if name.endswith("A_log") else o.dtype).eps
            # The project's dtype rule: ours is at most twice eager's distance from float64 ...
            ours_err = relative_error(o, r, scale=scale)
            assert ours_err <= 2 * eager_err + floor, f"{family} T={t} {name}: {ours_err:.3e} from float64, eager {eager_err:.3e}"
            # ... so ours equals eager to within three times eager's own float32 round-off.
            err = relative_error(o, b, scale=scale)
            assert err <= 3 * eager_err + floor, f"{family} T={t} {name}: {err:.3e} from eager (eager's float32 error {eager_err:.3e})"
    # One graph for both lengths; one planned SSD op per Mamba-2 layer, with the model's chunk.
    assert opt.compile_count == 1
    layers = mamba2_layers(eager)
    assert layers
    ssd = [r for r in opt.report.rewrites if r.pass_name == "ssd_scan"]
    assert len(ssd) == len(layers), opt.report
    assert all(r.kind == f"transformers {family} chunk scan -> ssd(adjoint-sharded)" for r in ssd), [r.kind for r in ssd]
    assert all(r.details["chunk_size"] == CHUNK and r.details["chunk_size_from"] == "model" for r in ssd)
    assert all("rounds x, B, C, Δ to float32" in r.details["precision"] for r in ssd)
    assert not [r for r in opt.report.refusals if r.pass_name == "ssd_scan"], opt.report


# -- the captured function on its own ------------------------------------------------------------
def scan_inputs(dtype, t=13, seed=0):
    """Mamba-2 scan inputs as the mixers pass them: activations in ``dtype``, A in float32
    (``-exp(A_log.float())``), D and dt_bias as parameters in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    x, dt, B, C, D, dt_bias, h0 = r(2, t, 4, 8), r(2, t, 4), r(2, t, 2, 4), r(2, t, 2, 4), r(4), r(4), r(2, 4, 8, 4)
    A = -torch.rand(4, generator=g, dtype=torch.float64).float() - 0.5
    return [v.to(dtype) for v in (x, dt)] + [A] + [v.to(dtype) for v in (B, C, D, dt_bias, h0)]


def library_scan(x, dt, A, B, C, D, dt_bias, h0, **kwargs):
    from transformers.models.mamba2 import modeling_mamba2

    return modeling_mamba2.mamba2_chunk_scan(x, dt, A, B, C, chunk_size=CHUNK, D=D, dt_bias=dt_bias, initial_states=h0,
                                             dt_softplus=True, dt_limit=(0.0, math.inf), return_final_states=True, **kwargs)


def test_every_family_copy_is_recognised_and_the_fused_and_decoding_functions_are_not():
    for family in _configs():
        __import__(f"transformers.models.{family}.modeling_{family}")
    found = {(m, f): s for m, f, s in captured_functions()}
    for family in _configs():
        assert found[(f"transformers.models.{family}.modeling_{family}", "mamba2_chunk_scan")] == f"transformers {family} chunk scan"
    assert not any("split_conv1d" in f or "state_update" in f for _, f in found)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_outputs_have_the_library_dtypes_and_at_least_its_precision(dtype):
    inputs = scan_inputs(dtype)
    lib_out, lib_final = library_scan(*inputs)
    opt = lc.optimize(library_scan, backend="aot_eager", strict=True)
    out, final = opt(*inputs)
    # transformers returns float32 + D·x (D's dtype where wider) and a float32 final state.
    assert (out.dtype, final.dtype) == (lib_out.dtype, lib_final.dtype) == (torch.promote_types(torch.float32, dtype), torch.float32)
    x, dt, A, B, C, D, dt_bias, h0 = (v.double() for v in inputs)
    ref_out, ref_final = ssd_reference(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, math.inf),
                                       initial_states=h0, return_final_states=True)
    for ours, lib, ref in ((out, lib_out, ref_out), (final, lib_final, ref_final)):
        assert relative_error(ours, ref) <= 2 * relative_error(lib, ref) + 4 * torch.finfo(ours.dtype).eps
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == "ssd_scan"]
    note = rewrite.details.get("precision")
    if dtype == torch.float32:
        assert note is None  # the same precision as the library
    elif dtype == torch.bfloat16:
        assert "computes Δ (bias add, softplus, clamp) in bfloat16" in note
    else:
        assert "rounds x, B, C, Δ to float32" in note and "initial state to float32" in note


def test_packed_documents_are_kept_apart_by_seq_idx():
    inputs = scan_inputs(torch.float64)
    seq_idx = torch.tensor([[0] * 5 + [1] * 8, [0] * 11 + [1] * 2], dtype=torch.int32)
    # transformers' torch path refuses packed sequences; the op keeps them apart as mamba_ssm does
    with pytest.raises(ValueError, match="packed sequences"):
        library_scan(*inputs, seq_idx=seq_idx)
    out, final = lc.optimize(library_scan, backend="aot_eager", strict=True)(*inputs, seq_idx=seq_idx)
    x, dt, A, B, C, D, dt_bias, h0 = inputs
    ref_out, ref_final = ssd_reference(x, dt, A, B, C, D=D, dt_bias=dt_bias, dt_softplus=True, dt_limit=(0.0, math.inf),
                                       initial_states=h0, seq_idx=seq_idx, return_final_states=True)
    assert relative_error(out, ref_out) <= 1e-12 and relative_error(final, ref_final.float()) <= torch.finfo(torch.float32).eps


def test_a_call_the_op_cannot_reproduce_runs_the_library_and_is_reported():
    inputs = scan_inputs(torch.float64)
    z = torch.randn(2, 13, 4, 8, dtype=torch.float64)
    opt = lc.optimize(library_scan, backend="aot_eager", strict=True)
    out, final = opt(*inputs, z=z)
    lib_out, lib_final = library_scan(*inputs, z=z)
    assert torch.equal(out, lib_out) and torch.equal(final, lib_final)
    assert not [r for r in opt.report.rewrites if r.pass_name == "ssd_scan"]
    (refusal,) = [r for r in opt.report.refusals if r.pass_name == "ssd_scan"]
    assert refusal.reason == ("transformers mamba2 chunk scan left to the library: "
                              "z is given, which transformers' torch path ignores (mamba_ssm's kernel applies it)")


def test_a_chunk_size_that_is_not_a_positive_int_gets_the_op_default():
    from transformers.models.mamba2 import modeling_mamba2

    def scan(x, dt, A, B, C):
        return modeling_mamba2.mamba2_chunk_scan(x, dt, A, B, C, chunk_size=None)

    x, dt, A, B, C = scan_inputs(torch.float64)[:5]
    opt = lc.optimize(scan, backend="aot_eager", strict=True)
    out = opt(x, dt, A, B, C)
    ref = ssd_reference(x, dt, A, B, C, dt_limit=(0.0, math.inf))
    # without D, transformers returns the float32 chunk form's output
    assert out.dtype == torch.float32 and relative_error(out, ref.float()) <= torch.finfo(torch.float32).eps
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == "ssd_scan"]
    assert rewrite.details["chunk_size"] == DEFAULT_CHUNK
    assert rewrite.details["chunk_size_from"] == "op default (the model's chunk_size: None, not a positive int)"


def test_mamba_ssm_combined_scan_is_captured_with_its_semantics(monkeypatch):
    # mamba_ssm needs CUDA: a stand-in module with its function's name, signature and dtypes
    # (output in x's dtype, float32 final state, z applied) exercises the recognition.
    name = "mamba_ssm.ops.triton.ssd_combined"
    module = types.ModuleType(name)

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None, seq_idx=None,
                                  cu_seqlens=None, dt_softplus=False, dt_limit=(0.0, math.inf), return_final_states=False,
                                  return_varlen_states=False):
        out, final = ssd_reference(x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit,
                                   initial_states=initial_states, seq_idx=seq_idx, return_final_states=True)
        return (out, final.float()) if return_final_states else out

    mamba_chunk_scan_combined.__module__ = name
    module.mamba_chunk_scan_combined = mamba_chunk_scan_combined
    monkeypatch.setitem(sys.modules, name, module)

    def scan(x, dt, A, B, C, D, dt_bias, h0, z):
        return module.mamba_chunk_scan_combined(x, dt, A, B, C, CHUNK, D=D, z=z, dt_bias=dt_bias, initial_states=h0,
                                                dt_softplus=True, return_final_states=True)

    inputs = scan_inputs(torch.bfloat16)
    z = torch.randn(2, 13, 4, 8).bfloat16()
    opt = lc.optimize(scan, backend="aot_eager", strict=True)
    out, final = opt(*inputs, z)
    lib_out, lib_final = scan(*inputs, z)
    assert (out.dtype, final.dtype) == (lib_out.dtype, lib_final.dtype) == (torch.bfloat16, torch.float32)
    ref_out, ref_final = scan(*(v.double() for v in inputs), z.double())
    for ours, lib, ref in ((out, lib_out, ref_out), (final, lib_final, ref_final)):
        assert relative_error(ours, ref) <= 2 * relative_error(lib, ref) + 4 * torch.finfo(ours.dtype).eps
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == "ssd_scan"]
    assert rewrite.kind == "mamba_ssm chunk scan -> ssd(adjoint-sharded)" and "precision" not in rewrite.details
