"""Op-level properties of chunked attention (CPU path): exactness, dtype rule, offload, opcheck."""

from __future__ import annotations

import contextlib
import gc

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx_compiler.kernels.attention import (
    attention_reference,
    chunked_attention,
    chunked_attention_backward,
    chunked_attention_forward,
)
from longctx_compiler.kernels.attention import chunked as attn_chunked
from longctx_compiler.kernels.attention import op as attn_op
from longctx_compiler.kernels.attention.reference import attention_reference_with_lse
from longctx_compiler.runtime import get_default_pool
from longctx_compiler.testing import assert_exact, assert_within_dtype_rule, make_tensor, strategies


@st.composite
def attention_cases(draw, max_len: int = 24):
    causal = draw(st.booleans())
    T = draw(strategies.sequence_lengths(1, max_len))
    # Causal uses SDPA's top-left convention for any S; draw S == T most of the time.
    S = draw(st.one_of(st.just(T), strategies.sequence_lengths(1, max_len)))
    hkv = draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, 2)),
        Hkv=hkv,
        Hq=hkv * draw(st.integers(1, 3)),
        T=T,
        S=S,
        D=draw(st.sampled_from([1, 3, 4, 8, 16])),
        chunk=draw(strategies.chunk_sizes(1, 16)),
        causal=causal,
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0))),
        seed=draw(strategies.seeds()),
    )


@contextlib.contextmanager
def cpu_path(use_kernel: bool):
    """Run the CPU implementation through ATen's flash kernel per chunk pair, or the generic path."""
    saved = attn_chunked.USE_CPU_KERNEL
    attn_chunked.USE_CPU_KERNEL = use_kernel
    try:
        yield
    finally:
        attn_chunked.USE_CPU_KERNEL = saved


def _inputs(c, dtype):
    q = make_tensor((c["B"], c["Hq"], c["T"], c["D"]), seed=c["seed"], dtype=dtype, requires_grad=True)
    k = make_tensor((c["B"], c["Hkv"], c["S"], c["D"]), seed=c["seed"] + 1, dtype=dtype, requires_grad=True)
    v = make_tensor((c["B"], c["Hkv"], c["S"], c["D"]), seed=c["seed"] + 2, dtype=dtype, requires_grad=True)
    return q, k, v


def _out_and_grads(fn, q, k, v):
    out = fn(q, k, v)
    # A fixed non-uniform cotangent: a plain sum would hide permutation bugs.
    w = make_tensor(out.shape, seed=7, dtype=torch.float64).to(out.dtype)
    return (out, *torch.autograd.grad((out * w).sum(), (q, k, v)))


@settings(deadline=None, max_examples=25)
@given(c=attention_cases(), offload=st.booleans(), kernel=st.booleans())
def test_float64_exact_against_reference(c, offload, kernel):
    with cpu_path(kernel):
        _check_float64_exact(c, offload)


def _check_float64_exact(c, offload):
    q, k, v = _inputs(c, torch.float64)
    ref = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, causal=c["causal"], scale=c["scale"]), q, k, v)
    got = _out_and_grads(
        lambda q, k, v: chunked_attention(q, k, v, causal=c["causal"], scale=c["scale"], chunk_size=c["chunk"], offload=offload),
        q, k, v,
    )
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
        assert_exact(a, b, name=name)


@settings(deadline=None, max_examples=20)
@given(c=attention_cases(), dtype=strategies.low_precision_dtypes(include_bf16=True), kernel=st.booleans())
def test_low_precision_dtype_rule(c, dtype, kernel):
    with cpu_path(kernel):
        _check_low_precision(c, dtype)


def _check_low_precision(c, dtype):
    q64, k64, v64 = _inputs(c, torch.float64)
    q, k, v = _inputs(c, dtype)
    ref = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, causal=c["causal"], scale=c["scale"]), q64, k64, v64)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=c["causal"], scale=c["scale"], enable_gqa=c["Hq"] != c["Hkv"]
        )

    base = _out_and_grads(sdpa, q, k, v)
    got = _out_and_grads(lambda q, k, v: chunked_attention(q, k, v, causal=c["causal"], scale=c["scale"], chunk_size=c["chunk"]), q, k, v)
    for name, g, b, r in zip(("out", "dq", "dk", "dv"), got, base, ref):
        assert g.dtype == dtype
        assert_within_dtype_rule(g, b, r, name=name)


@settings(deadline=None, max_examples=15)
@given(c=attention_cases())
def test_offload_on_off_identical(c):
    q, k, v = _inputs(c, torch.float32)
    kw = dict(causal=c["causal"], scale=c["scale"], chunk_size=c["chunk"])
    plain = _out_and_grads(lambda q, k, v: chunked_attention(q, k, v, offload=False, **kw), q, k, v)
    off = _out_and_grads(lambda q, k, v: chunked_attention(q, k, v, offload=True, **kw), q, k, v)
    for a, b in zip(plain, off):
        assert torch.equal(a, b)


@settings(deadline=None, max_examples=15)
@given(c=attention_cases())
def test_forward_backward_functions_and_lse(c):
    q, k, v = _inputs(c, torch.float64)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, causal=c["causal"], scale=c["scale"])
    out, lse = chunked_attention_forward(q.detach(), k.detach(), v.detach(), causal=c["causal"], scale=c["scale"], chunk_size=c["chunk"])
    assert lse.dtype == torch.float64 and lse.shape == q.shape[:3]
    assert_exact(out, ref_out, name="out")
    assert_exact(lse, ref_lse, name="lse")
    # The lse output is differentiable too: d lse_i / d s_ij = P_ij.
    dout = make_tensor(out.shape, seed=c["seed"] + 3)
    dlse = make_tensor(lse.shape, seed=c["seed"] + 4)
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), (q, k, v))
    grads = chunked_attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, causal=c["causal"],
                                       scale=c["scale"], chunk_size=c["chunk"], dlse=dlse)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_exact(a, b, name=name)


def test_reference_matches_sdpa_and_masks():
    q = make_tensor((2, 4, 7, 8), seed=1)
    k = make_tensor((2, 2, 9, 8), seed=2)
    v = make_tensor((2, 2, 9, 8), seed=3)
    for causal in (False, True):
        sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
        assert_exact(attention_reference(q, k, v, causal=causal), sd)
    keep = make_tensor((2, 1, 7, 9), seed=4) > -0.5
    keep[..., 0] = True
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)
    assert_exact(attention_reference(q, k, v, causal=False, mask=keep), sd)
    add = make_tensor((7, 9), seed=5)
    sd = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add, enable_gqa=True)
    assert_exact(attention_reference(q, k, v, causal=False, mask=add), sd)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_plain_ops(dtype, causal):
    q = make_tensor((1, 4, 5, 3), seed=1, dtype=dtype, requires_grad=True)
    k = make_tensor((1, 2, 5, 3), seed=2, dtype=dtype, requires_grad=True)
    v = make_tensor((1, 2, 5, 3), seed=3, dtype=dtype, requires_grad=True)
    torch.library.opcheck(torch.ops.longctx.chunked_attention_fwd.default, (q, k, v, causal, 0.5, 2))
    out, lse = chunked_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal, scale=0.5, chunk_size=2)
    dout = make_tensor(out.shape, seed=4, dtype=dtype)
    for dlse in (None, make_tensor(lse.shape, seed=5, dtype=lse.dtype)):
        torch.library.opcheck(
            torch.ops.longctx.chunked_attention_bwd.default,
            (dout, q.detach(), k.detach(), v.detach(), out, lse, dlse, causal, 0.5, 2),
        )


def test_opcheck_offload_ops():
    # The offload forward fills the host pool (a side effect) and returns a fresh handle id per
    # call, so the AOT-dispatch comparison (which runs it twice and compares outputs) does not
    # apply; schema, fake-tensor and autograd-registration checks do.
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    q = make_tensor((1, 2, 5, 4), seed=1, requires_grad=True)
    k = make_tensor((1, 1, 6, 4), seed=2, requires_grad=True)
    v = make_tensor((1, 1, 6, 4), seed=3, requires_grad=True)
    torch.library.opcheck(torch.ops.longctx.chunked_attention_fwd_offload.default, (q, k, v, False, 0.5, 2), test_utils=utils)
    out, lse, handle = torch.ops.longctx.chunked_attention_fwd_offload(q.detach(), k.detach(), v.detach(), False, 0.5, 2)
    dout = make_tensor(out.shape, seed=4)
    torch.library.opcheck(
        torch.ops.longctx.chunked_attention_bwd_offload.default, (dout, handle, None, 1, 6, False, 0.5, 2),
        test_utils=("test_schema", "test_faketensor"),
    )
    del handle
    gc.collect()


def _saved_for_backward(fn, *args):
    """Tensors AOTAutograd's forward graph returns beyond the user output (= saved for backward)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    saved = []

    def fw(gm, example_inputs):
        out_node = next(n for n in gm.graph.nodes if n.op == "output")
        vals = [a.meta.get("val") for a in out_node.args[0][1:]]
        saved.extend(x for x in vals if isinstance(x, torch.Tensor))
        return make_boxed_func(gm)

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm))
    compiled = torch.compile(fn, backend=backend, dynamic=True)
    out = compiled(*args)
    torch.autograd.grad(out.sum(), args)
    torch._dynamo.reset()
    return saved


def test_aot_saved_set_plain_vs_offload():
    q = make_tensor((1, 2, 10, 4), seed=1, dtype=torch.float32, requires_grad=True)
    k = make_tensor((1, 1, 10, 4), seed=2, dtype=torch.float32, requires_grad=True)
    v = make_tensor((1, 1, 10, 4), seed=3, dtype=torch.float32, requires_grad=True)
    plain = _saved_for_backward(lambda q, k, v: chunked_attention(q, k, v, causal=True, chunk_size=4), q, k, v)
    assert len(plain) == 5  # q, k, v, out, lse
    off = _saved_for_backward(lambda q, k, v: chunked_attention(q, k, v, causal=True, chunk_size=4, offload=True), q, k, v)
    assert len(off) == 1 and off[0].dtype == torch.int64 and off[0].dim() == 0
    gc.collect()
    assert get_default_pool().live_groups == 0


def test_offload_releases_handles_and_supports_retain_graph():
    pool = get_default_pool()
    gc.collect()
    before = pool.bytes_in_use
    q = make_tensor((1, 2, 6, 4), seed=1, requires_grad=True)
    k = make_tensor((1, 1, 6, 4), seed=2, requires_grad=True)
    v = make_tensor((1, 1, 6, 4), seed=3, requires_grad=True)
    out = chunked_attention(q, k, v, causal=True, chunk_size=4, offload=True)
    assert pool.bytes_in_use > before
    g1 = torch.autograd.grad(out.sum(), (q, k, v), retain_graph=True)
    g2 = torch.autograd.grad(out.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
    # Without retain_graph autograd frees the saved handle after backward: the group goes back.
    assert pool.bytes_in_use == before
    # A forward whose graph is dropped without backward releases its host copies too.
    out = chunked_attention(q, k, v, causal=True, chunk_size=4, offload=True)
    del out
    gc.collect()
    assert pool.bytes_in_use == before


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(q_shape=(1, 3, 4, 8), kv_shape=(1, 2, 4, 8)), ValueError, "multiple"),
        (dict(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 4, 6)), ValueError, "head dims"),
        (dict(q_shape=(2, 2, 4), kv_shape=(2, 2, 4)), ValueError, "4-D"),
        (dict(q_shape=(1, 2, 4, 8), kv_shape=(1, 2, 0, 8)), ValueError, "zero keys"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(scale=0.0), ValueError, "scale"),
        (dict(causal=1), TypeError, "causal"),
        (dict(kv_dtype=torch.float32), TypeError, "dtype"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q_shape = kwargs.pop("q_shape", (1, 2, 4, 8))
    kv_shape = kwargs.pop("kv_shape", (1, 2, 4, 8))
    kv_dtype = kwargs.pop("kv_dtype", torch.float64)
    q = torch.zeros(q_shape, dtype=torch.float64)
    k = torch.zeros(kv_shape, dtype=kv_dtype)
    with pytest.raises(exc, match=match):
        chunked_attention(q, k, k.clone(), **kwargs)


def test_integer_inputs_rejected():
    q = torch.zeros((1, 1, 2, 2), dtype=torch.int64)
    with pytest.raises(TypeError, match="dtype"):
        attention_reference(q, q, q, causal=False)
    assert attn_op.chunked_attention is chunked_attention
