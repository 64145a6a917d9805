"""Token-wise modules (MLPs) of layers that are not pipelined run chunk by chunk, recomputed in
backward: float64 exact on every gradient, one compile for every length, the rewrite fired on
every layer's MLP, no ``[T, intermediate]`` activation saved, and what is not token-wise
refused with the reason."""

import pytest
import torch
import torch.nn.functional as F

import longctx_compiler as lc
from lm_helpers import ids_for
from longctx_compiler.memory import measure_step
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, clone_module

transformers = pytest.importorskip("transformers")

PASS = "tiled_tokenwise"
COMMON = dict(hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
              max_position_embeddings=256)
MODELS = {
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **COMMON)),
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(use_parallel_residual=True, **COMMON)),
}


def optimized(m, chunk=8, **layers):
    # The LM loss is left to the model: logits are compared (its `.float()` would blur float64).
    return lc.optimize(m, backend="aot_eager", strict=True, lm_loss={"enabled": False}, attention={"chunk_size": 8},
                       layers={"tile_tokenwise": True, "chunk_size": chunk, **layers})


def logits_of(m, ids):
    return m(ids, use_cache=False).logits


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_mlp_is_tiled_exactly_with_one_compile(name):
    torch.manual_seed(0)
    eager = MODELS[name]().double()
    opt = optimized(clone_module(eager, torch.float64))
    for t, seed in ((21, 0), (5, 1)):  # not a multiple of, and below, the chunk
        assert_gradients_match(eager, opt, [ids_for(t, seed)], call=logits_of, rtol=EXACT_RTOL)
    modules = [r.details["module"] for r in opt.report.rewrites if r.pass_name == PASS]
    root = "gpt_neox" if name == "gpt_neox" else "model"
    assert modules == [f"{root}.layers.0.mlp", f"{root}.layers.1.mlp"], modules
    assert opt.compile_count == 1


def test_no_intermediate_activation_is_saved():
    torch.manual_seed(0)
    base = MODELS["llama"]()
    plain = lc.optimize(clone_module(base), backend="aot_eager", lm_loss={"enabled": False}, attention={"chunk_size": 64, "offload": False})
    tiled = lc.optimize(clone_module(base), backend="aot_eager", lm_loss={"enabled": False}, attention={"chunk_size": 64, "offload": False},
                        layers={"tile_tokenwise": True, "chunk_size": 64, "offload": False})
    ids = ids_for(512, 0)

    def step(m):
        return lambda: logits_of(m, ids).sum().backward()

    for m in (plain, tiled):
        step(m)()  # compile
    peak_plain = measure_step(step(plain), parameters=plain).peak_bytes
    peak_tiled = measure_step(step(tiled), parameters=tiled).peak_bytes
    # SwiGLU saves gate, up, silu(gate) and their product: 4 x [T, 96] per layer, 2 layers,
    # all alive at the start of backward; tiled, one chunk's at a time.
    assert peak_plain - peak_tiled >= 0.75 * 2 * 4 * 512 * 96 * 4, (peak_plain, peak_tiled)
    assert tiled.report.count(PASS) == 2


def test_off_by_default():
    torch.manual_seed(0)
    opt = lc.optimize(MODELS["llama"](), backend="aot_eager", lm_loss={"enabled": False})
    logits_of(opt, ids_for(9, 0)).sum().backward()
    assert opt.report.count(PASS) == 0 and not [r for r in opt.report.refusals if r.pass_name == PASS]


class ShiftedMLP(torch.nn.Module):
    """An MLP that mixes each token with the previous one: not token-wise."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16, dtype=torch.float64)
        self.down = torch.nn.Linear(16, 8, dtype=torch.float64)

    def forward(self, x):
        y = F.gelu(self.up(x))
        return self.down(y + F.pad(y, (0, 0, 1, 0))[:, :-1])


class Model(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x):
        return x + self.mlp(x)


def test_a_module_that_mixes_tokens_is_refused_with_the_reason_and_stays_exact():
    torch.manual_seed(0)
    eager = Model(ShiftedMLP())
    opt = lc.optimize(clone_module(eager, torch.float64), backend="aot_eager", layers={"tile_tokenwise": True, "chunk_size": 4})
    x = torch.randn(2, 11, 8, dtype=torch.float64, requires_grad=True)
    with pytest.warns(lc.RefusalWarning):
        assert_gradients_match(eager, opt, [x], rtol=EXACT_RTOL)
    (refusal,) = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert "not token-wise" in refusal.reason and opt.report.count(PASS) == 0


def float64_lm_loss(m, ids):
    """The causal-LM loss in float64 (transformers' own loss rounds the logits to float32)."""
    logits = m(ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def pipelined(m, **layers):
    return lc.optimize(m, backend="aot_eager", strict=True, attention={"chunk_size": 8, "offload": True},
                       layers={"enabled": True, "chunk_size": 8, **layers})


def test_the_stack_end_runs_as_a_block_with_its_input_in_the_host_pool():
    # A pipelined stack: the final norm (between the last layer and the tiled loss) becomes a
    # block whose input, the last layer's [B, T, H] output, waits in the host pool.
    from longctx_compiler.runtime import HostPool, set_default_pool

    torch.manual_seed(0)
    eager = MODELS["llama"]().double()
    opt = pipelined(clone_module(eager, torch.float64))
    for t, seed in ((21, 0), (5, 1)):
        ours = opt(ids_for(t, seed), labels=ids_for(t, seed), use_cache=False).loss
        ref = float64_lm_loss(eager, ids_for(t, seed))
        # transformers returns the loss in float32 (its `.float()`); ours computes it in float64
        # and rounds only the returned value, once.
        assert ours.dtype == torch.float32 and abs(ours.double() - ref) <= 2**-24 * abs(ref)
        got = torch.autograd.grad(ours, list(opt.parameters()))
        want = torch.autograd.grad(ref, list(eager.parameters()))
        for (name, _), a, b in zip(eager.named_parameters(), got, want):
            torch.testing.assert_close(a, b, rtol=EXACT_RTOL, atol=1e-13, msg=name)
    (end,) = [r.details for r in opt.report.rewrites if r.pass_name == PASS]
    assert end["module"] == "model.norm" and end["role"] == "stack end", end
    assert opt.report.count("pipelined_layers") == 2 and opt.compile_count == 1

    # The host tier holds the norm's input on top of what the layers keep there.
    without = pipelined(clone_module(eager, torch.float64), tile_tokenwise=False)
    pool, ids = HostPool(), ids_for(16, 2)
    previous = set_default_pool(pool) or HostPool()
    held = []
    try:
        for m in (opt, without):
            loss = m(ids, labels=ids, use_cache=False).loss
            held.append(pool.bytes_in_use)
            loss.backward()
            assert pool.bytes_in_use == 0
    finally:
        set_default_pool(previous)
    assert without.report.count(PASS) == 0
    assert held[0] - held[1] == ids.numel() * 32 * 8, held
