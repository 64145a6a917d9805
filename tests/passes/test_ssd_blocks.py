"""Block sharding of Mamba-2 blocks: each block around an SSD scan runs chunk by chunk.

Float64 exactness against eager (loss and every gradient) for any T — below, at and not a
multiple of the block chunk, chunks shorter than the convolution's halo — with one compile,
the rewrite fired on every layer; documents (``seq_idx``) starting at chunk boundaries and
inside chunks, with an initial state; every window one chunk plus its halo; the saved
tensors do not grow with ``T · d_inner``; the peak below block recompute's; the schemas name
the ops' arguments in order; transformers' Mamba2ForCausalLM (captured) sharded too.
"""

import pytest
import torch
import torch.nn as nn
from hypothesis import example, given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for, lm_call, loss_and_grads, loss_of
from longctx_compiler.kernels.selective_scan.schema import ScanArgs
from longctx_compiler.kernels.sequence_block import chunked
from longctx_compiler.kernels.ssd import ssd_scan
from longctx_compiler.kernels.ssd.schema import SSDArgs
from longctx_compiler.memory import measure_step
from longctx_compiler.nn import Mamba2Mixer, TinyMamba2LM
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, relative_error

PASS = "adjoint_sharded_blocks"
HALO = 3  # d_conv - 1


def tiny(layers=2, seed=0, dtype=torch.float64, **kw):
    torch.manual_seed(seed)
    return TinyMamba2LM(vocab_size=64, d_model=16, n_layers=layers, d_state=4, headdim=8, chunk_size=4, dtype=dtype, **kw)


def optimized(model, block, **ssm):
    return lc.optimize(model, backend="aot_eager", strict=True, ssm={"block_chunk_size": block, **ssm})


def test_schemas_name_the_ops_arguments_in_order():
    for op, schema in ((torch.ops.longctx.selective_scan_fwd.default, ScanArgs), (torch.ops.longctx.ssd_fwd.default, SSDArgs)):
        assert tuple(a.name for a in op._schema.arguments) == schema._fields


@pytest.mark.parametrize("block", [5, 2], ids=["chunk>halo", "chunk<halo"])
def test_exact_for_any_length_with_one_compile(block):
    eager, opt = tiny(), optimized(tiny(), block)

    @settings(max_examples=4, deadline=None)
    # From T = 3: at T = 2 the loss reads T - 1 = 1 next-token pair and Dynamo specialises on it.
    @given(t=st.integers(3, 23), seed=st.integers(0, 2**16))
    @example(t=3, seed=0)  # below the chunk (block 5)
    @example(t=4 * block, seed=1)  # a multiple of the chunk
    @example(t=4 * block + 1, seed=2)  # not a multiple
    def prop(t, seed):
        assert_gradients_match(eager, opt, [ids_for(t, seed)], loss_fn=loss_of, call=lm_call, rtol=EXACT_RTOL)

    prop()
    assert opt.compile_count == 1
    rewrites = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert [r.site.split(" ")[0] for r in rewrites] == ["mixers.0", "mixers.1"]
    assert all(r.details["halo"] == HALO and r.details["chunk_size"] == block and r.details["scan"] == "ssd" for r in rewrites)
    assert opt.report.count("recompute_ssm_blocks") == 0


class Documents(nn.Module):
    """A Mamba-2 mixer whose scan also takes document indices and a learned initial state."""

    def __init__(self):
        super().__init__()
        self.mixer = Mamba2Mixer(8, d_state=4, d_conv=2, expand=2, headdim=4, ngroups=2, chunk_size=3, dtype=torch.float64)
        self.h0 = nn.Parameter(torch.randn(1, self.mixer.nheads, 4, 4, dtype=torch.float64))

    def forward(self, x, seq_idx):
        m = self.mixer
        z, xBC, dt = m.in_proj(x).split([m.d_inner, m.conv_dim, m.nheads], dim=-1)
        xBC = torch.nn.functional.silu(m.conv1d(xBC.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2))
        xs, B, C = xBC.split([m.d_inner, 2 * 4, 2 * 4], dim=-1)
        y = ssd_scan(xs.unflatten(-1, (m.nheads, 4)), dt, -torch.exp(m.A_log), B.unflatten(-1, (2, 4)), C.unflatten(-1, (2, 4)),
                     D=m.D, dt_bias=m.dt_bias, dt_softplus=True, initial_states=self.h0.expand(x.shape[0], -1, -1, -1),
                     seq_idx=seq_idx, chunk_size=3)
        return m.out_proj(m.norm(y.flatten(-2), z))


class Layer(nn.Module):
    """A model of one block (a block is a module of its own)."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, seq_idx):
        return self.block(x, seq_idx)


def test_documents_reset_at_chunk_boundaries_and_inside_chunks():
    torch.manual_seed(3)
    eager = Layer(Documents())
    opt = lc.optimize(Layer(Documents()), backend="aot_eager", strict=True, ssm={"block_chunk_size": 4})
    opt.load_state_dict(eager.state_dict())
    # Halo 1 (d_conv = 2) and documents: resets at chunk starts (4, 8, 12) and inside chunks.
    for t, starts in ((13, [4, 6, 8, 12]), (9, [1, 4]), (16, [5, 8, 9])):
        g = torch.Generator().manual_seed(t)
        x = torch.randn(2, t, 8, dtype=torch.float64, generator=g)
        seq_idx = torch.zeros(2, t, dtype=torch.int32)
        for s in starts:
            seq_idx[0, s:] += 1
        seq_idx[1, starts[0]:] += 1  # the second row: one reset only
        assert_gradients_match(eager, opt, [x, seq_idx], loss_fn=lambda y: (y * y).sum(), rtol=EXACT_RTOL)
    assert opt.report.count(PASS) == 1 and opt.compile_count == 1
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert rewrite.details["halo"] == 1


def test_documents_need_the_token_before_each_chunk():
    # Without a convolution the block reads no earlier token itself; the reset check does.
    class NoConv(Documents):
        def forward(self, x, seq_idx):
            m = self.mixer
            z, xBC, dt = m.in_proj(x).split([m.d_inner, m.conv_dim, m.nheads], dim=-1)
            xs, B, C = xBC.split([m.d_inner, 8, 8], dim=-1)
            y = ssd_scan(xs.unflatten(-1, (m.nheads, 4)), dt, -torch.exp(m.A_log), B.unflatten(-1, (2, 4)),
                         C.unflatten(-1, (2, 4)), dt_softplus=True, seq_idx=seq_idx, chunk_size=3)
            return m.out_proj(m.norm(y.flatten(-2), z))

    torch.manual_seed(4)
    eager = Layer(NoConv())
    opt = lc.optimize(Layer(NoConv()), backend="aot_eager", strict=True, ssm={"block_chunk_size": 3})
    opt.load_state_dict(eager.state_dict())
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    seq_idx = torch.tensor([[0, 0, 0, 1, 1, 1, 2, 2, 3, 3]], dtype=torch.int64)
    assert_gradients_match(eager, opt, [x, seq_idx], loss_fn=lambda y: (y * y).sum(), rtol=EXACT_RTOL)
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert rewrite.details["halo"] == 1


@pytest.fixture
def windows(monkeypatch):
    """Records the sequence length of every window the block's body runs on."""
    seen = []
    plain = chunked._window

    def recording(plan, tensors, a, n, group=None):
        seen.append(n)
        return plain(plan, tensors, a, n, group)

    monkeypatch.setattr(chunked, "_window", recording)
    return seen


def test_every_window_is_one_chunk_plus_its_halo(windows):
    block, t = 6, 31
    opt = optimized(tiny(), block)
    ids = ids_for(t, 2)
    opt(ids, labels=ids).loss.backward()
    windows.clear()
    opt(ids, labels=ids).loss.backward()
    chunks = -(-t // block)
    # forward and backward, each layer, each chunk: one window of at most block + halo tokens
    assert len(windows) == 2 * 2 * chunks
    assert max(windows) == block + HALO and min(windows) == t - (chunks - 1) * block + HALO


def _optimized_fp32(t, **ssm):
    model = tiny(2, dtype=torch.float32, expand=4)
    opt = optimized(model, 64, **ssm)
    ids = ids_for(t, 3, batch=1)
    opt(ids, labels=ids).loss.backward()  # compile outside the measurement
    model.zero_grad(set_to_none=True)
    return model, opt, ids


def _saved_by_forward(t, **ssm) -> int:
    """Bytes of the distinct non-parameter storages the forward saves for backward."""
    model, opt, ids = _optimized_fp32(t, **ssm)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(x):
        ptr = x.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = opt(ids, labels=ids).loss
    assert opt.report.count(PASS) == (2 if ssm.get("shard_blocks", True) else 0)
    loss.backward()
    return sum(saved.values())


def test_saved_tensors_do_not_grow_with_the_inner_width():
    # Per token, a sharded Mamba-2 layer saves its input ([d_model]) and O(1/Q) states; the
    # rest of the model a few [d_model] vectors (norms, loss input). Plain autograd saves about
    # ten [d_inner] activations per layer (d_inner = 4 · d_model here).
    t, d_inner, layers = 256, 64, 2
    per_token = {shard: (_saved_by_forward(2 * t, shard_blocks=shard, recompute_blocks=False)
                         - _saved_by_forward(t, shard_blocks=shard, recompute_blocks=False)) / t for shard in (True, False)}
    inner_vector = d_inner * 4  # one [d_inner] float32 vector
    assert per_token[True] < layers * inner_vector, per_token
    assert per_token[False] > 4 * layers * inner_vector, per_token


def test_peak_memory_below_block_recompute():
    def step_memory(**ssm):
        model, opt, ids = _optimized_fp32(512, **ssm)
        return opt, measure_step(lambda: opt(ids, labels=ids).loss.backward(), parameters=model)

    sharded_opt, sharded = step_memory()
    recomputed_opt, recomputed = step_memory(shard_blocks=False)
    assert sharded_opt.report.count(PASS) == 2 and recomputed_opt.report.count("recompute_ssm_blocks") == 2
    assert sharded.peak_bytes * 2 <= recomputed.peak_bytes, (sharded.peak_bytes, recomputed.peak_bytes)


def test_transformers_mamba2_blocks_are_sharded():
    # transformers' Mamba2ForCausalLM reaches the SSD op through capture (mamba2_chunk_scan).
    # Its gated norm casts to float32 (forward, and its gradient in backward), which turns the
    # float64 round-off of a different summation order (chunk by chunk) into float32 round-off:
    # so sharded and unsharded runs must agree at least as well as eager transformers (its own
    # float32 scan) agrees with the unsharded run, quantity by quantity.
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Mamba2Config(hidden_size=16, vocab_size=64, num_hidden_layers=2, state_size=4, num_heads=4, head_dim=8,
                                    n_groups=2, expand=2, chunk_size=8)

    def build():
        torch.manual_seed(0)
        return transformers.Mamba2ForCausalLM(cfg).to(torch.float64).train()

    eager = build()
    sharded = lc.optimize(build(), backend="aot_eager", strict=True, ssm={"block_chunk_size": 5})
    unsharded = lc.optimize(build(), backend="aot_eager", strict=True, ssm={"shard_blocks": False, "recompute_blocks": False})
    for t in (3, 5, 13, 16):  # below, at, not a multiple of and a multiple of the block chunk
        ids = ids_for(t, t)
        base = loss_and_grads(unsharded, ids)
        for name, ours, theirs, ref in zip(["loss", *(n for n, _ in eager.named_parameters())],
                                           loss_and_grads(sharded, ids), loss_and_grads(eager, ids), base):
            assert relative_error(ours, ref) <= max(relative_error(theirs, ref), 1e-12), (t, name)
    assert sharded.compile_count == 1
    rewrites = [r for r in sharded.report.rewrites if r.pass_name == PASS]
    assert [r.site.split(" ")[0] for r in rewrites] == ["backbone.layers.0", "backbone.layers.1"]
    assert all(r.details["scan"] == "ssd" and r.details["halo"] == 3 for r in rewrites)
