"""Op-level properties of the tiled LM head + cross-entropy: float64 exactness, the dtype rule,
ignored labels (all of them too), precomputed logits, the lse cotangent, opcheck, and that
nothing ``[N, V]`` is saved for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx_compiler.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from longctx_compiler.kernels.linear_cross_entropy.chunked import tile_rows, tiles
from longctx_compiler.kernels.linear_cross_entropy.reference import accumulation_dtype
from longctx_compiler.testing import assert_exact, assert_within_dtype_rule, make_tensor, relative_error, strategies

FWD = torch.ops.longctx.linear_cross_entropy_fwd.default
BWD = torch.ops.longctx.linear_cross_entropy_bwd.default


@st.composite
def lce_cases(draw, max_tokens: int = 40, allow_all_ignored: bool = True):
    n = draw(st.integers(0 if allow_all_ignored else 1, max_tokens))
    ignore = draw(st.sampled_from(["none", "some", "all"] if allow_all_ignored else ["none", "some"]))
    return dict(
        N=n,
        H=draw(st.sampled_from([1, 3, 8])),
        V=draw(st.integers(1, 17)),
        chunk=draw(strategies.chunk_sizes(1, 16)),
        bias=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "sum"])),
        ignore=ignore,
        ignore_index=draw(st.sampled_from([-100, 0])),
        precomputed=draw(st.booleans()),
        seed=draw(strategies.seeds()),
    )


def _inputs(c, dtype):
    g = torch.Generator().manual_seed(c["seed"])
    h = make_tensor((c["N"], c["H"]), seed=g, dtype=dtype, low=-2, high=2, requires_grad=True)
    w = make_tensor((c["V"], c["H"]), seed=g, dtype=dtype, low=-2, high=2, requires_grad=True)
    b = make_tensor((c["V"],), seed=g, dtype=dtype, requires_grad=True) if c["bias"] else None
    labels = torch.randint(0, c["V"], (c["N"],), generator=g)
    if c["ignore"] == "all":
        labels.fill_(c["ignore_index"])
    elif c["ignore"] == "some":
        drop = torch.rand(c["N"], generator=g) < 0.3
        labels[drop] = c["ignore_index"]
    return h, w, b, labels


def _loss_and_grads(fn, h, w, b, labels):
    loss = fn(h, w, b, labels)
    leaves = [h, w] + ([b] if b is not None else [])
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def _ours(c):
    def f(h, w, b, labels):
        logits = F.linear(h, w, b) if c["precomputed"] else None
        return linear_cross_entropy(h, w, labels, b, logits=logits, ignore_index=c["ignore_index"], reduction=c["reduction"], chunk_size=c["chunk"])

    return f


def _reference(c):
    return lambda h, w, b, labels: linear_cross_entropy_reference(h, w, labels, b, ignore_index=c["ignore_index"], reduction=c["reduction"])


def _plain(c):
    # What a model computes: logits in the model's dtype, upcast (`.float()` in transformers;
    # float64 stays float64 here), then the loss.
    def f(h, w, b, labels):
        logits = F.linear(h, w, b).to(accumulation_dtype(h.dtype))
        return F.cross_entropy(logits, labels, ignore_index=c["ignore_index"], reduction=c["reduction"])

    return f


def _plain_tiled(c):
    # The same plain PyTorch, on the op's tiles of rows: a matmul over fewer rows rounds
    # differently (another kernel, another order), and which rounding is luckier varies from
    # case to case. Both are plain PyTorch's own error.
    def f(h, w, b, labels):
        rows = tile_rows(h.shape[0], h.shape[1], w.shape[0], c["chunk"])
        logits = torch.cat([F.linear(h[s:e], w, b) for s, e in tiles(h.shape[0], rows)]).to(accumulation_dtype(h.dtype))
        return F.cross_entropy(logits, labels, ignore_index=c["ignore_index"], reduction=c["reduction"])

    return f


def _less_lucky(ref, *baselines):
    """Per output, the baseline with the larger error against ``ref``."""
    return [max(bs, key=lambda b: relative_error(b, r)) for r, *bs in zip(ref, *baselines)]


NAMES = ("loss", "dh", "dweight", "dbias")


@settings(deadline=None, max_examples=60)
@given(c=lce_cases())
def test_float64_exact_against_reference(c):
    h, w, b, labels = _inputs(c, torch.float64)
    ref = _loss_and_grads(_reference(c), h, w, b, labels)
    got = _loss_and_grads(_ours(c), h, w, b, labels)
    all_ignored = c["N"] == 0 or bool((labels == c["ignore_index"]).all())
    for name, a, e in zip(NAMES, got, ref):
        assert a.dtype == e.dtype == torch.float64, name
        if name == "loss" and all_ignored and c["reduction"] == "mean":
            # F.cross_entropy's 0/0: NaN, with zero (not NaN) gradients, checked below.
            assert torch.isnan(a) and torch.isnan(e)
            continue
        assert_exact(a, e, name=name)
    if all_ignored:
        assert all(not g.isnan().any() and not g.any() for g in got[1:])


@settings(deadline=None, max_examples=40)
@given(c=lce_cases(allow_all_ignored=False), dtype=strategies.low_precision_dtypes(include_bf16=True))
def test_low_precision_dtype_rule(c, dtype):
    ref = _loss_and_grads(_reference(c), *_inputs(c, torch.float64))
    base = _less_lucky(ref, _loss_and_grads(_plain(c), *_inputs(c, dtype)), _loss_and_grads(_plain_tiled(c), *_inputs(c, dtype)))
    got = _loss_and_grads(_ours(c), *_inputs(c, dtype))
    for name, g, b, r in zip(NAMES, got, base, ref):
        assert g.dtype == b.dtype, name  # float32 loss, gradients in the input dtype
        assert_within_dtype_rule(g, b, r, name=f"{dtype} {name}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_every_label_ignored_matches_cross_entropy(dtype, reduction):
    c = dict(N=9, H=4, V=6, chunk=4, bias=True, reduction=reduction, ignore="all", ignore_index=-100, precomputed=False, seed=3)
    h, w, b, labels = _inputs(c, dtype)
    want = _loss_and_grads(_plain(c), h, w, b, labels)
    got = _loss_and_grads(_ours(c), h, w, b, labels)
    # mean: NaN loss (0 / 0), sum: 0; gradients exactly zero in both, never NaN.
    torch.testing.assert_close(got[0], want[0], equal_nan=True, rtol=0, atol=0)
    for g, e in zip(got[1:], want[1:]):
        assert torch.equal(g, e) and not g.any()


def test_lse_cotangent_float64_exact():
    c = dict(N=23, H=5, V=11, chunk=6, bias=True, reduction="mean", ignore="some", ignore_index=-100, precomputed=False, seed=11)
    h, w, b, labels = _inputs(c, torch.float64)
    wl = make_tensor((23,), seed=5)

    def ours(h, w, b, labels):
        loss, lse = FWD(h, w, b, labels, None, -100, "mean", 6)
        return loss + (lse * wl).sum()

    def ref(h, w, b, labels):
        logits = F.linear(h, w, b)
        return F.cross_entropy(logits, labels) + (torch.logsumexp(logits, -1) * wl).sum()

    for name, a, e in zip(NAMES, _loss_and_grads(ours, h, w, b, labels), _loss_and_grads(ref, h, w, b, labels)):
        assert_exact(a, e, name=name)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("precomputed", [False, True])
def test_opcheck(bias, precomputed):
    c = dict(N=13, H=5, V=7, chunk=4, bias=bias, reduction="mean", ignore="some", ignore_index=-100, precomputed=precomputed, seed=1)
    h, w, b, labels = _inputs(c, torch.float64)
    logits = F.linear(h, w, b).detach() if precomputed else None
    for reduction in ("mean", "sum"):
        torch.library.opcheck(FWD, (h, w, b, labels, logits, -100, reduction, 4))
    loss, lse = FWD(h, w, b, labels, None, -100, "mean", 4)
    dloss = torch.tensor(0.7, dtype=torch.float64)
    torch.library.opcheck(BWD, (dloss, None, h.detach(), w.detach(), None if b is None else b.detach(), labels, lse.detach(), -100, "mean", 4))
    torch.library.opcheck(BWD, (dloss, make_tensor((13,), seed=2), h.detach(), w.detach(), None if b is None else b.detach(), labels, lse.detach(), -100, "sum", 4))


@pytest.mark.parametrize("precomputed", [False, True])
def test_saved_for_backward_holds_nothing_token_by_vocab(precomputed):
    N, H, V = 37, 6, 29
    c = dict(N=N, H=H, V=V, chunk=8, bias=True, reduction="mean", ignore="some", ignore_index=-100, precomputed=precomputed, seed=4)
    h, w, b, labels = _inputs(c, torch.float32)
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    # The precomputed logits' own linear (which saves h and weight for itself) runs outside.
    logits = F.linear(h, w, b) if precomputed else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(h, w, labels, b, logits=logits, chunk_size=8)
    # Exactly h, weight, bias, labels and the per-token lse (float32) — no [N, V] tensor.
    assert sorted(saved, key=str) == sorted(
        [((N, H), torch.float32), ((V, H), torch.float32), ((V,), torch.float32), ((N,), torch.int64), ((N,), torch.float32)], key=str
    )
    assert not any(s[0] == (N, V) or (len(s[0]) == 2 and s[0][0] * s[0][1] >= N * V) for s in saved)
    loss.backward()
    assert h.grad is not None and w.grad is not None and b.grad is not None


def test_arguments_are_validated_with_a_remedy():
    h = make_tensor((4, 3), seed=0)
    w = make_tensor((5, 3), seed=1)
    y = torch.tensor([0, 1, 2, -100])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, y, reduction="none")
    with pytest.raises(TypeError, match="int64"):
        linear_cross_entropy(h, w, y.to(torch.int32))
    with pytest.raises(TypeError, match="share one dtype"):
        linear_cross_entropy(h, w.float(), y)
    with pytest.raises(ValueError, match=r"\[V, 3\]"):
        linear_cross_entropy(h, make_tensor((5, 2), seed=1), y)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, y, chunk_size=0)
    with pytest.raises(ValueError, match="logits"):
        linear_cross_entropy(h, w, y, logits=make_tensor((4, 4), seed=2))


def test_automatic_tiles_hold_no_more_logits_than_the_hidden_states_and_stay_bounded():
    from longctx_compiler.kernels.linear_cross_entropy.chunked import AUTO, MAX_AUTO_TILE, MIN_AUTO_ROWS, tile_rows

    assert tile_rows(2048, 32, 256, AUTO) == 256  # [256, 256] logits = [2048, 32] hidden
    assert tile_rows(10, 4, 1000, AUTO) == MIN_AUTO_ROWS
    # A long sequence: the tile stops at MAX_AUTO_TILE logits, whatever T is.
    for n in (1 << 16, 1 << 20):
        assert tile_rows(n, 256, 16000, AUTO) == MAX_AUTO_TILE // 16000
    # A vocabulary so large that the cap is below the minimum: the minimum wins.
    assert tile_rows(1 << 20, 2048, 1 << 17, AUTO) == MIN_AUTO_ROWS
    assert tile_rows(2048, 32, 256, 7) == 7
    # default (automatic) tiles: 300 tokens, H = 8, V = 16 -> two tiles of 150; exact
    g = torch.Generator().manual_seed(0)
    h = torch.randn(300, 8, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(16, 8, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 16, (300,), generator=g)
    ours = linear_cross_entropy(h, w, y)
    ref = F.cross_entropy(F.linear(h, w), y)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    for a, b in zip(torch.autograd.grad(ours, (h, w)), torch.autograd.grad(ref, (h, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


@settings(deadline=None, max_examples=30)
@given(c=lce_cases(allow_all_ignored=False), logit_scale=st.sampled_from([1.0, 0.125, -0.5, 3.0]),
       softcap=st.sampled_from([0.0, 0.5, 2.5, 30.0]))
def test_logit_transform_float64_exact(c, logit_scale, softcap):
    # Granite (scale 1/logits_scaling), Cohere (logit_scale), Gemma (soft-capping), combined.
    h, w, b, labels = _inputs(c, torch.float64)
    want = _loss_and_grads(lambda h, w, b, y: linear_cross_entropy_reference(
        h, w, y, b, ignore_index=c["ignore_index"], reduction=c["reduction"], logit_scale=logit_scale, softcap=softcap), h, w, b, labels)

    def ours(h, w, b, y):
        logits = F.linear(h, w, b) if c["precomputed"] else None
        return linear_cross_entropy(h, w, y, b, logits=logits, ignore_index=c["ignore_index"], reduction=c["reduction"],
                                    chunk_size=c["chunk"], logit_scale=logit_scale, softcap=softcap)

    all_ignored = bool((labels == c["ignore_index"]).all())
    for name, g, r in zip(NAMES, _loss_and_grads(ours, h, w, b, labels), want):
        if name == "loss" and all_ignored and c["reduction"] == "mean":
            assert torch.isnan(g) and torch.isnan(r)  # F.cross_entropy's 0/0
            continue
        assert_exact(g, r, name=name)


@pytest.mark.parametrize("kw, err", [({"softcap": -1.0}, ValueError), ({"logit_scale": float("nan")}, TypeError),
                                     ({"softcap": True}, TypeError)])
def test_bad_logit_transform_is_a_clear_error(kw, err):
    c = dict(N=3, H=2, V=4, chunk=2, bias=False, reduction="mean", ignore="none", ignore_index=-100, precomputed=False, seed=0)
    h, w, _, labels = _inputs(c, torch.float64)
    with pytest.raises(err, match="linear_cross_entropy: (softcap|logit_scale)"):
        linear_cross_entropy(h, w, labels, **kw)
