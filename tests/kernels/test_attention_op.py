"""Op-level properties of chunked attention (CPU path): exactness, dtype rule, offload, opcheck."""

from __future__ import annotations

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
from attention_helpers import cpu_path


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
        # None: chosen from the shapes at run time.
        chunk=draw(st.one_of(strategies.chunk_sizes(1, 16), st.none())),
        causal=causal,
        # Negative and zero scales too: ATen's CPU kernel returned nan for causal + scale <= 0.
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.floats(-2.0, -0.05), st.just(0.0))),
        seed=draw(strategies.seeds()),
    )


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

    def hand_written(q, k, v):
        # Eager SDPA on CPU returns nan for causal + scale <= 0 (ATen's flash kernel); plain
        # PyTorch's other spelling is the baseline there.
        return _eager(q, k, v, causal=c["causal"], scale=c["scale"])

    broken = c["causal"] and c["scale"] is not None and c["scale"] <= 0
    base = _out_and_grads(hand_written if broken else sdpa, q, k, v)
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


def _eager(q, k, v, *, causal, scale=None, mask_fill=True):
    """Hand-written eager attention (the ``transformers`` eager spelling, GQA by repeat)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        T, S = s.shape[-2:]
        masked = torch.ones(T, S, dtype=torch.bool).triu(1)
        if mask_fill:
            s = s.masked_fill(masked, float("-inf"))
        else:
            s = s + torch.zeros(T, S, dtype=s.dtype).masked_fill(masked, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


# ------------------------------------------------------------------ issue 14, item 2
@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("scale", [-0.5, -1e-3, 0.0, -3.0])
@pytest.mark.parametrize("chunk", [4, 13, None])
def test_causal_negative_and_zero_scale_are_exact(scale, kernel, chunk):
    # Was nan on the CPU fast path (ATen's flash kernel masks with -inf before scaling).
    c = dict(B=1, Hq=2, Hkv=1, T=13, S=13, D=4, seed=3)
    q, k, v = _inputs(c, torch.float64)
    ref = _out_and_grads(lambda q, k, v: attention_reference(q, k, v, causal=True, scale=scale), q, k, v)
    eager = _out_and_grads(lambda q, k, v: _eager(q, k, v, causal=True, scale=scale), q, k, v)
    with cpu_path(kernel):
        got = _out_and_grads(lambda q, k, v: chunked_attention(q, k, v, causal=True, scale=scale, chunk_size=chunk), q, k, v)
    for name, a, r, e in zip(("out", "dq", "dk", "dv"), got, ref, eager):
        assert torch.isfinite(a).all(), name
        assert_exact(a, r, name=name)
        assert_exact(a, e, name=f"{name} vs eager")


def test_cpu_kernel_is_used_only_where_it_is_exact():
    q = make_tensor((1, 2, 8, 4), seed=1)
    k = make_tensor((1, 1, 8, 4), seed=2)
    applies = attn_chunked.cpu_kernel_applies
    assert applies(q, k, k, causal=True, scale=0.5)
    assert applies(q, k, k, causal=False, scale=-0.5) and applies(q, k, k, causal=False, scale=0.0)
    assert not applies(q, k, k, causal=True, scale=-0.5)
    assert not applies(q, k, k, causal=True, scale=0.0)
    # T != S with causal: only as one chunk pair (the kernel's mask is top-left per call).
    k9 = make_tensor((1, 1, 9, 4), seed=3)
    assert applies(q, k9, k9, causal=True, scale=0.5, chunk_size=None)
    assert applies(q, k9, k9, causal=True, scale=0.5, chunk_size=9)
    assert not applies(q, k9, k9, causal=True, scale=0.5, chunk_size=4)
    # Non-finite inputs, or scores that could overflow: the torch path.
    for bad in (float("nan"), float("inf"), float("-inf")):
        kb = k.clone()
        kb[0, 0, 3, 1] = bad
        assert not applies(q, kb, k, causal=False, scale=0.5)
        assert not applies(q, k, kb, causal=False, scale=0.5)
        assert not applies(q, k, k, causal=False, scale=0.5, dout=torch.full_like(q, bad))
    assert not applies(q * 1e200, k * 1e200, k, causal=False, scale=0.5)
    # Empty sequences never reach the kernel.
    assert not applies(q[:, :, :0], k, k, causal=False, scale=0.5)
    assert not applies(q, k[:, :, :0], k[:, :, :0], causal=False, scale=0.5)


# ------------------------------------------------------------------ empty and broadcast inputs
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("T, S", [(0, 0), (0, 5), (5, 0), (1, 1), (1, 5)])
def test_empty_sequences_match_plain_torch(T, S, causal):
    c = dict(B=2, Hq=2, Hkv=1, T=T, S=S, D=4, seed=5)
    q, k, v = _inputs(c, torch.float64)
    want = _out_and_grads(lambda q, k, v: _eager(q, k, v, causal=causal, scale=0.5), q, k, v)
    for offload in (False, True):
        got = _out_and_grads(lambda q, k, v: chunked_attention(q, k, v, causal=causal, scale=0.5, chunk_size=2, offload=offload), q, k, v)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
            assert a.shape == b.shape, name
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    out, lse = chunked_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal, scale=0.5, chunk_size=2)
    if S == 0:
        assert (lse == float("-inf")).all() and (out == 0).all()


def test_strided_and_expanded_inputs():
    q = make_tensor((1, 7, 4, 8), seed=1, requires_grad=True)
    k = make_tensor((1, 1, 7, 8), seed=2, requires_grad=True)
    v = make_tensor((2, 7, 1, 8), seed=3, requires_grad=True)

    def views(q, k, v):
        # [B, T, H, D] transposed, a batch and a head broadcast as stride-0 views.
        return q.transpose(1, 2).expand(2, 4, 7, 8), k.expand(2, 2, 7, 8), v.transpose(1, 2).expand(2, 2, 7, 8)

    ref = _out_and_grads(lambda *x: attention_reference(*(t.contiguous() for t in views(*x)), causal=True), q, k, v)
    for kernel in (True, False):
        with cpu_path(kernel):
            got = _out_and_grads(lambda *x: chunked_attention(*views(*x), causal=True, chunk_size=3), q, k, v)
        for name, a, b in zip(("out", "dq", "dk", "dv"), got, ref):
            assert_exact(a, b, name=name)


def test_zero_lse_tangent_keeps_the_fast_backward(monkeypatch):
    # AOTAutograd passes a zero tangent for an lse nobody reads; it used to force the generic
    # backward, which holds [G·C, C] fp32 blocks (72 MiB instead of 7 at T = 1024).
    calls = []
    original = attn_chunked._backward_cpu_kernel
    monkeypatch.setattr(attn_chunked, "_backward_cpu_kernel", lambda *a: calls.append(1) or original(*a))
    q = make_tensor((1, 2, 9, 4), seed=1)
    k = make_tensor((1, 1, 9, 4), seed=2)
    out, lse = chunked_attention_forward(q, k, k, causal=True, scale=0.5, chunk_size=4)
    dout = make_tensor(out.shape, seed=3)
    with_zero = chunked_attention_backward(dout, q, k, k, out, lse, causal=True, scale=0.5, chunk_size=4, dlse=torch.zeros_like(lse))
    assert calls == [1]
    without = chunked_attention_backward(dout, q, k, k, out, lse, causal=True, scale=0.5, chunk_size=4)
    for a, b in zip(with_zero, without):
        assert torch.equal(a, b)
    assert calls == [1, 1]
    # A nonzero d(lse) still takes the path that honours it.
    chunked_attention_backward(dout, q, k, k, out, lse, causal=True, scale=0.5, chunk_size=4, dlse=torch.ones_like(lse))
    assert calls == [1, 1]


def test_auto_chunk_size_choice():
    q = make_tensor((1, 8, 1024, 32), seed=1)
    k = make_tensor((1, 2, 1024, 32), seed=2)
    # ATen's kernel tiles inside: one pair. The torch path: a score block no larger than q.
    assert attn_chunked.auto_chunk_size(q, k, fast=True) == 1024
    c = attn_chunked.auto_chunk_size(q, k, fast=False)
    assert attn_chunked.MIN_AUTO_CHUNK <= c < 1024 and 2 * c * c <= 1024 * 32
    assert attn_chunked.auto_chunk_size(q[:, :, :5], k[:, :, :5], fast=False) == 5


@pytest.mark.parametrize("kernel", [True, False])
def test_auto_chunk_peak_memory_is_eager_sdpas(kernel):
    # With chunk_size=None the step needs what eager SDPA's needs (issue 9 item 5: chunk 1024
    # at T = 1024 needed 5x eager's peak).
    from longctx_compiler.memory import measure_step

    def step(fn, q0, k0, v0):
        q, k, v = (t.detach().clone().requires_grad_() for t in (q0, k0, v0))
        keep = []
        return measure_step(lambda: keep.append(fn(q, k, v).sum().backward()), device="cpu").peak_bytes

    q0 = make_tensor((1, 8, 1024, 32), seed=1, dtype=torch.float32)
    k0 = make_tensor((1, 2, 1024, 32), seed=2, dtype=torch.float32)
    v0 = make_tensor((1, 2, 1024, 32), seed=3, dtype=torch.float32)
    eager = step(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), q0, k0, v0)
    with cpu_path(kernel):
        ours = step(lambda q, k, v: chunked_attention(q, k, v, causal=True, chunk_size=None), q0, k0, v0)
    assert ours <= 1.1 * eager, (ours, eager)


# ------------------------------------------------------------------ non-finite values
def _math_rows(q, k, v, *, causal, scale):
    """Attention row by row over exactly the keys each query sees: the math's nan pattern
    (nothing multiplies a masked entry, unlike any dense spelling)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
    T, S = q.shape[2], k.shape[2]
    rows = []
    for i in range(T):
        n = min(i + 1, S) if causal else S
        s = torch.matmul(q[:, :, i : i + 1], k[:, :, :n].transpose(-1, -2)) * scale
        rows.append(torch.matmul(torch.softmax(s, dim=-1), v[:, :, :n]))
    return torch.cat(rows, dim=2)


def _nonfinite_case(which, value, pos, causal, chunk, kernel):
    c = dict(B=1, Hq=2, Hkv=1, T=13, S=13, D=4, seed=11)
    q, k, v = (t.detach() for t in _inputs(c, torch.float64))
    dict(q=q, k=k, v=v)[which][0, 0, pos, 1] = value
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    run = lambda fn: _out_and_grads(fn, q, k, v)  # noqa: E731
    math_ = run(lambda q, k, v: _math_rows(q, k, v, causal=causal, scale=0.5))
    eager = [run(lambda q, k, v: _eager(q, k, v, causal=causal, scale=0.5, mask_fill=f)) for f in (True, False)]
    with cpu_path(kernel):
        ours = run(lambda q, k, v: chunked_attention(q, k, v, causal=causal, scale=0.5, chunk_size=chunk))
    return ours, math_, eager


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("which, value", [(w, x) for w in "qk" for x in (float("nan"), float("inf"), float("-inf"))])
def test_nan_and_inf_in_queries_and_keys_follow_softmax(which, value, causal, kernel):
    # A nan key poisons every query that attends to it, through the max and the sum, and no
    # other; the fast path used to drop it (ATen's vectorised max skips nan).
    for pos in (0, 6, 12):
        for chunk in (4, 13, None):
            ours, math_, eager = _nonfinite_case(which, value, pos, causal, chunk, kernel)
            out, m = ours[0], math_[0]
            assert torch.equal(torch.isnan(out), torch.isnan(m)), (pos, chunk, torch.isnan(out).sum(), torch.isnan(m).sum())
            assert torch.equal(torch.isinf(out), torch.isinf(m)), (pos, chunk)
            _assert_between(ours, math_, eager, (which, pos, chunk))


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("causal", [True, False])
def test_nan_and_inf_in_values_stay_within_eagers_pattern(value, causal):
    # A value enters through a product with the probabilities: every row that reads it is
    # poisoned (as in the math); a masked entry of a computed chunk pair multiplies it too
    # (0·nan), as eager's dense matmul does for every row.
    for pos in (0, 6, 12):
        for chunk in (4, 13, None):
            ours, math_, eager = _nonfinite_case("v", value, pos, causal, chunk, False)
            _assert_between(ours, math_, eager, ("v", pos, chunk))


def _assert_between(ours, math_, eager, where):
    """math's non-finite entries ⊆ ours ⊆ eager's (either spelling); finite ones agree."""
    for name, a, m, e1, e2 in zip(("out", "dq", "dk", "dv"), ours, math_, *eager):
        bad_a, bad_m = ~torch.isfinite(a), ~torch.isfinite(m)
        bad_e = ~torch.isfinite(e1) | ~torch.isfinite(e2)
        assert bool((bad_m <= bad_a).all()), (name, where, "a non-finite entry of the math is finite in ours")
        assert bool((bad_a <= bad_e).all()), (name, where, "ours is non-finite where eager is finite")
        both = ~bad_a & ~bad_m
        torch.testing.assert_close(a[both], m[both], rtol=1e-9, atol=1e-9, msg=f"{name} {where}")


def test_merge_partial_with_minus_inf_running_lse():
    # Every score of the first part -inf (from the data): the merge used to return lse = nan.
    out = torch.zeros(1, 3, 2, dtype=torch.float64)
    lse = torch.full((1, 3), float("-inf"), dtype=torch.float64)
    part = torch.ones(1, 3, 2, dtype=torch.float64)
    lse_part = torch.tensor([[0.5, float("-inf"), 2.0]], dtype=torch.float64)
    o, l = attn_chunked.merge_partial(out, lse, part, lse_part)
    assert torch.equal(l, lse_part)
    assert torch.equal(o, torch.tensor([[[1.0, 1.0], [0.0, 0.0], [1.0, 1.0]]], dtype=torch.float64))


# ------------------------------------------------------------------ autocast and the pool budget
def test_autocast_casts_like_sdpa():
    q = make_tensor((1, 4, 9, 8), seed=1, dtype=torch.float32, requires_grad=True)
    k = make_tensor((1, 2, 9, 8), seed=2, dtype=torch.bfloat16, requires_grad=True)
    v = make_tensor((1, 2, 9, 8), seed=3, dtype=torch.float32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_attention(q, k, v, causal=True, chunk_size=4)
        want_dtype = torch.nn.functional.scaled_dot_product_attention(q, k.float(), v, is_causal=True, enable_gqa=True).dtype
    assert got.dtype == want_dtype == torch.bfloat16
    # Exactly the op on the inputs autocast casts, and gradients in each input's own dtype.
    cast = [t.detach().to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    plain = chunked_attention(*cast, causal=True, chunk_size=4)
    assert torch.equal(got, plain)
    w = make_tensor(got.shape, seed=4, dtype=torch.bfloat16)
    g = torch.autograd.grad((got * w).sum(), (q, k, v))
    gp = torch.autograd.grad((plain * w).sum(), cast)
    for a, b, t in zip(g, gp, (q, k, v)):
        assert a.dtype == t.dtype and torch.equal(a, b.to(t.dtype))
    # float64 is not cast (autocast's rule); autocast off: no cast.
    q64 = make_tensor((1, 2, 5, 4), seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert chunked_attention(q64, q64, q64).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert chunked_attention(q.detach(), q.detach(), q.detach()).dtype == torch.float32


def test_pool_budget_is_an_argument_not_a_setting():
    from longctx_compiler.runtime import HostMemoryError

    pool = get_default_pool()
    limit = pool.max_bytes
    q = make_tensor((1, 2, 16, 8), seed=1, requires_grad=True)
    with pytest.raises(HostMemoryError, match="budget"):
        chunked_attention(q, q, q, causal=True, chunk_size=4, offload=True, host_pool_bytes=1024)
    assert pool.max_bytes == limit and pool.live_groups == 0
    # Unbounded calls (and calls with a larger budget) are unaffected.
    out = chunked_attention(q, q, q, causal=True, chunk_size=4, offload=True)
    out2 = chunked_attention(q, q, q, causal=True, chunk_size=4, offload=True, host_pool_bytes=1 << 20)
    torch.autograd.grad((out + out2).sum(), q)
    gc.collect()
    assert pool.live_groups == 0


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
    # chunk 0: chosen from the shapes; a negative scale; the (ignored) pool budget.
    torch.library.opcheck(torch.ops.longctx.chunked_attention_fwd.default, (q, k, v, causal, -0.5, 0, 1 << 20))
    # q laid out [B, T, H, D] (as after a projection): out keeps that layout on every path.
    qt = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()
    for kernel in (True, False):
        with cpu_path(kernel):
            torch.library.opcheck(torch.ops.longctx.chunked_attention_fwd.default, (qt, k, v, causal, 0.5, 0))
            torch.library.opcheck(torch.ops.longctx.chunked_attention_fwd.default, (qt, k, v, causal, 0.5, 2))
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
    torch.library.opcheck(torch.ops.longctx.chunked_attention_fwd_offload.default, (q, k, v, True, 0.5, 0, 1 << 20), test_utils=utils)
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
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(chunk_size=2.0), TypeError, "chunk_size"),
        (dict(scale=float("inf")), ValueError, "scale"),
        (dict(scale=float("nan")), ValueError, "scale"),
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
