"""The attention pass on plain functions: SDPA variants drawn by hypothesis, masks, refusals."""

import math

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from longctx_compiler.testing import EXACT_RTOL, assert_within_dtype_rule, make_tensor, relative_error


def opt(fn, chunk=4, **kw):
    return lc.optimize(fn, backend="aot_eager", strict=True, attention={"chunk_size": chunk, "offload": False}, sequence_dim=2, **kw)


def qkv(b, hq, hkv, t, d, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [make_tensor(shape, seed=g, dtype=dtype, requires_grad=True) for shape in ((b, hq, t, d), (b, hkv, t, d), (b, hkv, t, d))]


@settings(max_examples=12, deadline=None)
@given(
    b=st.integers(1, 2), hkv=st.integers(1, 2), groups=st.integers(1, 3), t=st.integers(1, 19), d=st.sampled_from([4, 8]),
    chunk=st.integers(1, 8), causal=st.booleans(), scaled=st.booleans(), seed=st.integers(0, 2**16),
)
def test_sdpa_variants_are_rewritten_exactly(b, hkv, groups, t, d, chunk, causal, scaled, seed):
    torch._dynamo.reset()  # head counts and head dims change between examples
    scale = 0.3 if scaled else None

    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)

    q, k, v = qkv(b, hkv * groups, hkv, t, d, seed)
    fo = opt(f, chunk)
    w = make_tensor((b, hkv * groups, t, d), seed=seed + 1)
    got = torch.autograd.grad((fo(q, k, v) * w).sum(), (q, k, v))
    want = torch.autograd.grad((f(q, k, v) * w).sum(), (q, k, v))
    for name, a, e in zip("qkv", got, want):
        assert relative_error(a, e, scale=1e-6 * max(x.norm().item() for x in want)) <= EXACT_RTOL, name
    assert fo.report.count("chunked_attention") == 1
    rw = fo.report.rewrites[0]
    assert rw.details["causal"] == causal and rw.details["gqa_groups"] == groups


def test_float32_and_bfloat16_follow_the_dtype_rule():
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    for dtype in (torch.float32, torch.bfloat16):
        torch._dynamo.reset()
        ref_in = qkv(2, 4, 2, 37, 16, 0)
        low_in = [x.detach().to(dtype).requires_grad_() for x in ref_in]
        fo = opt(f, 8)
        w = make_tensor((2, 4, 37, 16), seed=9)
        ref = torch.autograd.grad((f(*ref_in) * w).sum(), ref_in)
        base = torch.autograd.grad((f(*low_in) * w.to(dtype)).float().sum(), low_in)
        cand = torch.autograd.grad((fo(*low_in) * w.to(dtype)).float().sum(), low_in)
        for name, c, bb, r in zip("qkv", cand, base, ref):
            assert_within_dtype_rule(c, bb, r, name=f"{dtype} d{name}")
        assert fo.report.count("chunked_attention") == 1


def test_boolean_causal_mask_is_proven_and_arbitrary_mask_refused():
    def masked(q, k, v):
        t = q.shape[2]
        keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)

    q, k, v = qkv(1, 2, 2, 11, 8, 1)
    fo = opt(masked)
    torch.testing.assert_close(fo(q, k, v), masked(q, k, v), rtol=1e-12, atol=1e-12)
    assert fo.report.count("chunked_attention") == 1 and fo.report.rewrites[0].details["causal"]

    torch._dynamo.reset()

    def arbitrary(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    mask = torch.rand(11, 11, generator=torch.Generator().manual_seed(0)) > 0.3
    mask.fill_diagonal_(True)
    fo = opt(arbitrary)
    torch.testing.assert_close(fo(q, k, v, mask), arbitrary(q, k, v, mask))
    assert fo.report.count("chunked_attention") == 0
    assert "not proven causal" in fo.report.refusals[0].reason


def test_dropout_in_training_is_refused_and_p0_accepted():
    q, k, v = qkv(1, 2, 2, 9, 8, 2)
    fo = opt(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.2, is_causal=True))
    torch.manual_seed(0)
    fo(q, k, v)
    assert fo.report.count() == 0 and "dropout" in fo.report.refusals[0].reason
    torch._dynamo.reset()
    fo = opt(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=True))
    fo(q, k, v)
    assert fo.report.count("chunked_attention") == 1


def test_hand_written_attention_with_division_and_no_mask():
    def f(q, k, v):
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        return torch.matmul(torch.softmax(s, dim=-1), v)

    q, k, v = qkv(2, 2, 2, 13, 8, 3)
    fo = opt(f)
    torch.testing.assert_close(fo(q, k, v), f(q, k, v), rtol=1e-12, atol=1e-12)
    assert fo.report.rewrites[0].kind == "matmul-softmax-matmul -> chunked_attention"
    assert fo.report.rewrites[0].details["causal"] is False


def test_disabled_attention_config_leaves_graph_alone():
    q, k, v = qkv(1, 2, 2, 9, 8, 4)
    fo = lc.optimize(lambda q, k, v: F.scaled_dot_product_attention(q, k, v), backend="aot_eager", attention={"enabled": False})
    fo(q, k, v)
    assert fo.report.count() == 0 and not fo.report.refusals
