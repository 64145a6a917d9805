"""The block-sharding pass: each block around a scan runs chunk by chunk along the sequence.

Float64 exactness against eager (loss and every gradient) for any T, including chunks
shorter than the convolution's halo, with one compile; in float32, within twice plain
PyTorch's own error against float64; the rewrite fired on every layer;
every run of the block's body, forward and backward, sees at most one chunk plus its halo;
peak memory falls below block recompute's; ``opcheck`` on the op; documents (``seq_idx``)
starting at chunk boundaries and inside chunks, with an initial state, with and without a
convolution; and the loud failures (unknown plan, inconsistent sizes).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from lm_helpers import ids_for, lm_call, loss_and_grads, loss_of
from longctx_compiler.kernels.sequence_block import chunked, get_plan
from longctx_compiler.memory import measure_step
from longctx_compiler.nn import SelectiveSSM, TinyMambaLM, selective_scan_fn
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, assert_within_dtype_rule, clone_module
from test_ssd_blocks import Layer  # one block as a module of its own

PASS = "adjoint_sharded_blocks"
HALO = 3  # TinyMambaLM's d_conv - 1


def tiny(layers=2, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return TinyMambaLM(vocab_size=64, d_model=16, n_layers=layers, d_state=4, dtype=dtype)


def optimized(model, block, **ssm):
    return lc.optimize(model, backend="aot_eager", strict=True, ssm={"chunk_size": 4, "block_chunk_size": block, **ssm})


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


@pytest.mark.parametrize("block", [5, 2], ids=["chunk>halo", "chunk<halo"])
def test_exact_for_any_length_with_one_compile(block):
    eager, opt = tiny(), optimized(tiny(), block)

    @settings(max_examples=4, deadline=None)
    # From T = 3: at T = 2 the loss reads T - 1 = 1 next-token pair and Dynamo specialises on it.
    @given(t=st.integers(3, 23), seed=st.integers(0, 2**16))
    def prop(t, seed):
        assert_gradients_match(eager, opt, [ids_for(t, seed)], loss_fn=loss_of, call=lm_call, rtol=EXACT_RTOL)

    prop()
    assert opt.compile_count == 1
    rewrites = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert [r.site.split(" ")[0] for r in rewrites] == ["mixers.0", "mixers.1"]
    assert all(r.details["halo"] == HALO and r.details["chunk_size"] == block for r in rewrites)
    assert opt.report.count("recompute_ssm_blocks") == 0


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_float32_within_twice_plain_pytorchs_error(backend):
    reference = tiny()
    plain, model = clone_module(reference, torch.float32), clone_module(reference, torch.float32)
    opt = lc.optimize(model, backend=backend, ssm={"chunk_size": 4, "block_chunk_size": 7})
    ids = ids_for(29, 5)
    for name, cand, base, ref in zip(
        ["loss", *(n for n, _ in model.named_parameters())],
        loss_and_grads(opt, ids), loss_and_grads(plain, ids), loss_and_grads(reference, ids),
    ):
        cand_err, base_err = assert_within_dtype_rule(cand, base, ref, name=name)
        assert base_err < 1e-3, (name, base_err)  # the same weights: float32 round-off only
    assert opt.report.count(PASS) == 2


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


def test_peak_memory_below_block_recompute():
    ids = ids_for(512, 3, batch=1)

    def step_memory(shard):
        model = tiny(2, dtype=torch.float32)
        opt = optimized(model, 64, shard_blocks=shard)
        opt(ids, labels=ids).loss.backward()  # compile outside the measurement
        model.zero_grad(set_to_none=True)
        return opt, measure_step(lambda: opt(ids, labels=ids).loss.backward(), parameters=model)

    sharded_opt, sharded = step_memory(True)
    recomputed_opt, recomputed = step_memory(False)
    assert sharded_opt.report.count(PASS) == 2 and recomputed_opt.report.count("recompute_ssm_blocks") == 2
    # Recompute holds a whole block's activations in backward (about ten [T, D_inner]
    # tensors, T = 512); sharding one 64-token chunk of them at a time. (Saved-tensor totals
    # do not compare: the sharded backward saves per chunk, inside its own autograd graphs.)
    assert sharded.peak_bytes * 2 <= recomputed.peak_bytes, (sharded.peak_bytes, recomputed.peak_bytes)


@pytest.fixture
def block_calls(monkeypatch):
    """The arguments of every sequence_block_fwd call (tensors, sizes, plan name)."""
    calls = []
    plain = chunked.block_forward
    from longctx_compiler.kernels.sequence_block import op

    def recording(plan, tensors, sizes, pool=None):
        calls.append(([t.detach().clone() for t in tensors], list(sizes), plan))
        return plain(plan, tensors, sizes, pool)

    monkeypatch.setattr(op, "block_forward", recording)
    return calls


def test_opcheck(block_calls):
    opt = optimized(tiny(1), 4)
    ids = ids_for(11, 1, batch=1)
    opt(ids, labels=ids).loss.backward()
    tensors, sizes, plan = block_calls[0]
    (key,) = [k for k in _plan_keys() if get_plan(k) is plan]
    tensors = [t.requires_grad_(t.is_floating_point()) for t in tensors]
    torch.library.opcheck(torch.ops.longctx.sequence_block_fwd.default, (tensors, sizes, key))


def _plan_keys():
    from longctx_compiler.kernels.sequence_block import op

    return list(op._PLANS)


def test_unknown_plan_and_inconsistent_sizes_fail_loudly(block_calls):
    with pytest.raises(RuntimeError, match="no plan named"):
        get_plan("sequence_block_missing")
    opt = optimized(tiny(1), 4)
    ids = ids_for(9, 1, batch=1)
    opt(ids, labels=ids).loss.backward()
    tensors, sizes, plan = block_calls[0]
    assert sizes == [9]
    with pytest.raises(RuntimeError, match="do not match the sequence length"):
        chunked.block_forward(plan, tensors, [10])


def test_disabled_by_config_falls_back_to_recompute():
    opt = optimized(tiny(), 4, shard_blocks=False)
    ids = ids_for(9, 0)
    opt(ids, labels=ids).loss.backward()
    assert opt.report.count(PASS) == 0 and opt.report.count("recompute_ssm_blocks") == 2


def test_the_same_step_is_bitwise_reproducible_first_call_included():
    # The first call compiles, and calls the op under another dispatch state than later
    # calls; the op runs its body in one fixed state, so every step gives the same bits.
    model = tiny()
    opt = optimized(model, 5)
    ids = ids_for(23, 1)
    steps = [loss_and_grads(opt, ids) for _ in range(3)]
    assert opt.report.count(PASS) == 2
    for later in steps[1:]:
        assert all(torch.equal(a, b) for a, b in zip(steps[0], later))


class ScanDocuments(nn.Module):
    """A Mamba mixer whose selective scan also takes document indices and a learned initial
    state (``d_conv = 0``: no convolution, so the block itself reads no earlier token)."""

    def __init__(self, d_conv=2):
        super().__init__()
        self.mixer = SelectiveSSM(8, d_state=4, d_conv=max(d_conv, 1), expand=2, dtype=torch.float64)
        self.conv = d_conv > 0
        self.h0 = nn.Parameter(torch.randn(1, self.mixer.d_inner, 4, dtype=torch.float64))

    def forward(self, x, seq_idx):
        m, T = self.mixer, x.shape[1]
        xi, z = m.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        if self.conv:
            xi = F.silu(m.conv1d(xi)[..., :T])
        dt, Bm, Cm = m.x_proj(xi.transpose(1, 2)).split([m.dt_rank, m.d_state, m.d_state], dim=-1)
        delta = F.linear(dt, m.dt_proj.weight).transpose(1, 2)
        y = selective_scan_fn(xi, delta, -torch.exp(m.A_log), Bm.transpose(1, 2), Cm.transpose(1, 2), m.D, z,
                              delta_bias=m.dt_proj.bias, delta_softplus=True, h0=self.h0.expand(x.shape[0], -1, -1), seq_idx=seq_idx)
        return m.out_proj(y.transpose(1, 2))


@st.composite
def document_starts(draw, t, block):
    """Document starts of one batch row: at chunk boundaries, inside chunks, length-1
    documents, or any; the index numbered from an arbitrary base."""
    kind = draw(st.sampled_from(["chunk_starts", "inside", "length_one", "any"]))
    if kind == "chunk_starts":
        starts = set(range(block, t, block))
    elif kind == "length_one":
        starts = set(range(1, t))
    elif kind == "inside":
        starts = draw(st.sets(st.sampled_from([s for s in range(1, t) if s % block]), min_size=1, max_size=3))
    else:
        starts = draw(st.sets(st.integers(1, t - 1)))
    base = draw(st.integers(0, 2))
    return [base + sum(1 for s in starts if s <= i) for i in range(t)]


@pytest.mark.parametrize("d_conv,block", [(2, 4), (0, 3)], ids=["halo 1 (conv)", "no conv"])
def test_selective_scan_documents_chunk_by_chunk_equal_the_whole_sequence(d_conv, block):
    # A document starting at a chunk's first token resets the carried state (the window reads
    # the token before the chunk: halo >= 1 even without a convolution); resets inside a
    # chunk are the scan's own. Batch rows with different layouts; an initial state.
    torch.manual_seed(5)
    eager = Layer(ScanDocuments(d_conv))
    opt = lc.optimize(Layer(ScanDocuments(d_conv)), backend="aot_eager", strict=True, ssm={"chunk_size": 2, "block_chunk_size": block})
    opt.load_state_dict(eager.state_dict())

    @settings(max_examples=6, deadline=None)
    @given(t=st.integers(2 * block + 1, 4 * block + 1), data=st.data(), seed=st.integers(0, 2**16))
    def prop(t, data, seed):
        rows = [data.draw(document_starts(t, block)) for _ in range(2)]
        seq_idx = torch.tensor(rows, dtype=data.draw(st.sampled_from([torch.int32, torch.int64])))
        x = torch.randn(2, t, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        assert_gradients_match(eager, opt, [x, seq_idx], loss_fn=lambda y: (y * y).sum(), rtol=EXACT_RTOL)

    prop()
    (rewrite,) = [r for r in opt.report.rewrites if r.pass_name == PASS]
    assert rewrite.details["halo"] == 1 and rewrite.details["scan"] == "selective_scan"
    assert opt.report.count("recompute_ssm_blocks") == 0


def test_selective_scan_documents_need_the_token_before_each_chunk():
    from longctx_compiler.kernels.sequence_block.carry import Carry, scan_in_window
    from longctx_compiler.kernels.selective_scan.schema import ScanArgs

    u = torch.randn(1, 2, 4, dtype=torch.float64)
    args = ScanArgs(u, u.clone(), -torch.ones(2, 3, dtype=torch.float64), torch.randn(1, 3, 4, dtype=torch.float64),
                    torch.randn(1, 3, 4, dtype=torch.float64), seq_idx=torch.zeros(1, 4, dtype=torch.int64))
    carry = Carry(0, 4, [torch.zeros(1, 2, 3, dtype=torch.float64)], None, 0)
    with pytest.raises(RuntimeError, match="halo of at least 1"):
        scan_in_window(*args, 0, carry)
