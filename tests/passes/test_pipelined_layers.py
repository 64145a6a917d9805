"""The layer-pipelining pass on hand-written decoder layers: what the prover takes and refuses.

Float64 exactness against eager (output and every gradient) for layers with RoPE from
positions computed outside the layer, a token shift before attention (a halo), a hybrid
layer with a scan and an attention (both carries), a single token (left alone: its graph
has no length symbol), layers whose attention has a sliding window, soft-capped scores, sinks
or packed documents;
refusals with the reason
(a reduction along T, non-causal attention, a position table computed inside the layer) while
the other layers are still pipelined; every run of the body sees one chunk plus its halo; no
``O(T)`` tensor other than the layer's output and input gradient is created on the device
inside the op (the rest lives in the host pool).
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import longctx_compiler as lc
from longctx_compiler.kernels.sequence_block import chunked, op
from longctx_compiler.nn import SelectiveSSM
from longctx_compiler.passes.pipelined_layers import PipelinedLayersPass
from longctx_compiler.runtime import HostPool, get_default_pool, set_default_pool
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match

PASS = "pipelined_layers"
D, HEADS, KV_HEADS = 16, 4, 2
HEAD = D // HEADS


def identity(layer, h):
    return h


def token_shift(layer, h):
    # RWKV-style: each token also reads the one before it (a halo of 1).
    return h + 0.5 * F.pad(h, (0, 0, 1, 0))[:, :-1]


def centre(layer, h):
    return h - h.mean(dim=1, keepdim=True)


def own_positions(layer, h):
    # A position table made inside the layer from the length: the window would restart at 0.
    return h + torch.arange(h.shape[1], dtype=h.dtype)[None, :, None]


class Layer(nn.Module):
    """norm → q/k/v → RoPE(cos, sin) → causal SDPA (GQA) → o → +x → norm → SwiGLU → +x."""

    def __init__(self, pre=identity, post=identity, causal=True, ssm=False, window=0, softcap=0.0, sinks=False):
        super().__init__()
        self.pre, self.post, self.causal = pre, post, causal
        # The op's variants, called directly (the attention pass's output for Mistral, Gemma 2, gpt-oss).
        self.window, self.softcap = window, softcap
        self.sinks = nn.Parameter(torch.randn(HEADS)) if sinks else None
        self.norm1, self.norm2 = nn.RMSNorm(D), nn.RMSNorm(D)
        self.q, self.k, self.v = nn.Linear(D, D), nn.Linear(D, KV_HEADS * HEAD), nn.Linear(D, KV_HEADS * HEAD)
        self.o = nn.Linear(D, D, bias=False)
        self.gate, self.up, self.down = nn.Linear(D, 24, bias=False), nn.Linear(D, 24, bias=False), nn.Linear(24, D, bias=False)
        self.ssm = SelectiveSSM(D, d_state=4) if ssm else None

    def forward(self, x, cos, sin, documents=None):
        b, t, _ = x.shape
        if self.ssm is not None:
            # A hybrid layer: the scan's output feeds the attention (Jamba's order within a
            # layer pair); the attention's q/k/v read it at their own position.
            x = x + self.ssm(self.norm2(x))
        h = self.pre(self, self.norm1(x))
        q = self.q(h).view(b, t, HEADS, HEAD).transpose(1, 2)
        k = self.k(h).view(b, t, KV_HEADS, HEAD).transpose(1, 2)
        v = self.v(h).view(b, t, KV_HEADS, HEAD).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if self.window or self.softcap or self.sinks is not None or documents is not None:
            ids = () if documents is None else (documents,)
            a = torch.ops.longctx.chunked_attention_fwd.default(q, k, v, True, HEAD**-0.5, 3, None, self.window, self.softcap, self.sinks,
                                                                *ids)[0]
        else:
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, enable_gqa=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, D))
        m = self.norm2(x)
        x = x + self.down(F.silu(self.gate(m)) * self.up(m))
        return self.post(self, x)


def rope(x, cos, sin):
    x1, x2 = x[..., : HEAD // 2], x[..., HEAD // 2:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Net(nn.Module):
    def __init__(self, *layers):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, HEAD, 2, dtype=torch.float64) / HEAD))

    def forward(self, x, documents=None):
        pos = torch.arange(x.shape[1], dtype=x.dtype)
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[None, None]
        cos, sin = emb.cos(), emb.sin()
        for layer in self.layers:
            x = layer(x, cos, sin) if documents is None else layer(x, cos, sin, documents)
        return x


def twins(*layers, seed=0):
    def make():
        torch.manual_seed(seed)
        return Net(*[Layer(**kw) for kw in layers]).double()

    return make(), make()


def optimized(net, chunk, **kw):
    return lc.optimize(net, backend="aot_eager", strict=True, attention={"chunk_size": 3, "offload": False},
                       extra_passes=(PipelinedLayersPass(enabled=True, chunk_size=chunk, **kw),))


def inputs(t, seed, batch=2):
    return torch.randn(batch, t, D, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).requires_grad_()


def rewrites(opt):
    return [r for r in opt.report.rewrites if r.pass_name == PASS]


def test_exact_for_any_length_and_chunk_with_one_compile():
    @settings(max_examples=4, deadline=None)
    @given(chunk=st.sampled_from([1, 3, 8]), lengths=st.lists(st.integers(2, 30), min_size=3, max_size=3), seed=st.integers(0, 2**16))
    def prop(chunk, lengths, seed):
        torch._dynamo.reset()
        eager, net = twins({}, {"pre": token_shift}, seed=seed)
        opt = optimized(net, chunk)
        for t in [chunk, chunk + 1, *lengths]:
            if t >= 2:
                assert_gradients_match(eager, opt, [inputs(t, seed + t)], rtol=EXACT_RTOL)
        assert [r.details["halo"] for r in rewrites(opt)] == [0, 1]
        assert opt.compile_count == 1

    prop()


def test_windows_soft_caps_sinks_and_documents_read_their_part_of_the_history_exactly():
    # Windows smaller and larger than the chunk, starting inside an earlier chunk; soft-capped
    # scores; sinks once per row (their gradient included): every chunk against the op run on
    # the whole sequence.
    # With packed documents (drawn starts) the K/V history keeps its keys' ids: a chunk sees
    # the earlier chunks' keys of its own document only.
    @settings(max_examples=8, deadline=None)
    @given(chunk=st.sampled_from([2, 4, 7]), window=st.sampled_from([1, 3, 5, 9]), softcap=st.sampled_from([0.0, 2.0]),
           sinks=st.booleans(), t=st.integers(2, 26), starts=st.sets(st.integers(1, 25), max_size=4), seed=st.integers(0, 2**16))
    def prop(chunk, window, softcap, sinks, t, starts, seed):
        torch._dynamo.reset()
        variant = {"window": window, "softcap": softcap, "sinks": sinks}
        eager, net = twins(variant, {**variant, "window": 0, "sinks": True}, seed=seed)
        opt = optimized(net, chunk)
        args = [inputs(t, seed)]
        if starts:
            documents = torch.zeros(2, t, dtype=torch.long)
            for s in starts:
                documents[0, s:] += 1  # the second row: one document
            args.append(documents)
        assert_gradients_match(eager, opt, args, rtol=EXACT_RTOL)
        assert len(rewrites(opt)) == 2

    prop()


def test_a_single_token_gets_its_own_graph_and_stays_exact():
    # Dynamo specialises T = 1: no length symbol to run windows of, so the layers are left
    # alone, with the reason.
    eager, net = twins({}, {"pre": token_shift})
    opt = optimized(net, 4)
    assert_gradients_match(eager, opt, [inputs(1, 0)], rtol=EXACT_RTOL)
    refused = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert len(refused) == 2 and all("not a symbol" in r.reason for r in refused)


def test_a_hybrid_layer_carries_a_state_and_a_kv_history():
    eager, net = twins({"ssm": True}, {})
    opt = lc.optimize(net, backend="aot_eager", strict=True, attention={"chunk_size": 3, "offload": False},
                      ssm={"chunk_size": 2}, extra_passes=(PipelinedLayersPass(enabled=True, chunk_size=5),))
    for t in (4, 13, 17):
        assert_gradients_match(eager, opt, [inputs(t, t)], rtol=EXACT_RTOL)
    assert len(rewrites(opt)) == 2
    assert rewrites(opt)[0].details["halo"] == 3  # the scan's convolution reaches 3 tokens back
    assert opt.compile_count == 1


@pytest.mark.parametrize("layer, reason", [
    ({"pre": centre}, "leaves the sequence dim"),
    ({"causal": False}, "not causal"),
    ({"pre": own_positions}, "sequence length"),
])
def test_refused_layers_say_why_and_the_others_are_still_pipelined(layer, reason):
    eager, net = twins({}, layer)
    opt = optimized(net, 4)
    assert_gradients_match(eager, opt, [inputs(11, 1)], rtol=EXACT_RTOL)
    assert [r.site.split(" ")[0] for r in rewrites(opt)] == ["layers.0"]
    refused = [r for r in opt.report.refusals if r.pass_name == PASS]
    assert len(refused) == 1 and reason in refused[0].reason, refused


def test_every_window_is_one_chunk_plus_its_halo(monkeypatch):
    seen = []
    plain = chunked._window

    def recording(plan, tensors, a, n, group=None):
        seen.append(n)
        return plain(plan, tensors, a, n, group)

    monkeypatch.setattr(chunked, "_window", recording)
    _, net = twins({"pre": token_shift})
    opt = optimized(net, 4)
    x = inputs(18, 2)
    opt(x).sum().backward()
    # forward and backward, 5 chunks each: 4 tokens plus the 1-token halo (the first: none)
    assert sorted(seen) == sorted([4, 5, 5, 5, 3] * 2)


class _Sequence(TorchDispatchMode):
    """Every tensor an aten op produces that runs along the sequence (a dim of size T)."""

    def __init__(self, t):
        super().__init__()
        self.t, self.seen = t, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in torch.utils._pytree.tree_leaves(out):
            if isinstance(x, torch.Tensor) and (self.t in x.shape or x.numel() >= self.t * 2 * D):
                self.seen.append((func, tuple(x.shape), x.untyped_storage().data_ptr()))
        return out


@pytest.fixture
def pool():
    fresh = HostPool()
    previous = set_default_pool(fresh) or HostPool()
    yield fresh
    set_default_pool(previous)


def test_nothing_sequence_long_but_the_output_and_input_gradient_is_made_on_the_device(monkeypatch, pool):
    calls = []
    plain = op.block_forward

    def recording(plan, tensors, sizes, pool=None):
        calls.append((plan, [t.detach() for t in tensors], list(sizes)))
        return plain(plan, tensors, sizes, pool)

    monkeypatch.setattr(op, "block_forward", recording)
    _, net = twins({})
    opt = optimized(net, 8, offload=True)
    b, t = 2, 64
    opt(inputs(t, 3, batch=b)).sum().backward()
    plan, tensors, sizes = calls[0]
    # gradients for x and the weights; the RoPE tables come from a buffer
    tensors = [x.requires_grad_(x.is_floating_point() and tuple(x.shape) != (1, 1, t, HEAD)) for x in tensors]
    with _Sequence(t) as meter:
        outs, boundaries, group = chunked.block_forward(plan, tensors, sizes)
    douts = [torch.ones_like(o) for o in outs]
    with meter:
        grads = chunked.block_backward(plan, tensors, [x.shape for x in tensors], sizes, boundaries, group, douts,
                                       [x.requires_grad for x in tensors])
    host = pool.data_ptrs()
    on_device = {(shape, ptr) for _, shape, ptr in meter.seen if ptr not in host}
    # (views of the inputs, e.g. detach(), are no new memory)
    allowed = {x.untyped_storage().data_ptr() for x in [*outs, *douts, *tensors, *(g for g in grads if g is not None)]}
    # The layer's input x [B, T, D] and the RoPE tables [1, 1, T, HEAD] wait in the host pool;
    # the K/V history [B, KV_HEADS, T, HEAD] and its dK/dV accumulators are there too.
    assert {shape for shape, ptr in on_device if ptr not in allowed} == set(), on_device
    made = {shape for shape, ptr in on_device if ptr in {x.untyped_storage().data_ptr() for x in [*outs, *grads] if x is not None}}
    assert made == {(b, t, D)}
    group.release()
    assert pool.bytes_in_use == 0


def test_disabled_by_default():
    eager, net = twins({})
    opt = lc.optimize(net, backend="aot_eager", strict=True)
    assert_gradients_match(eager, opt, [inputs(9, 0)], rtol=EXACT_RTOL)
    assert not rewrites(opt) and opt.report.count("chunked_attention") == 1
