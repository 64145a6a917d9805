"""Sliding window, logit soft-capping and attention sinks in chunked attention (CPU path, ops).

Every property is stated in float64 against the float64 reference (autograd of
``attention_reference`` gives every gradient, ``dsinks`` included), through the public function
and the four ops (plain and offload, forward and backward).
"""

from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from longctx_compiler.kernels.attention import chunked_attention, chunked_attention_backward, chunked_attention_forward
from longctx_compiler.kernels.attention import chunked as attn_chunked
from longctx_compiler.kernels.attention.reference import attention_reference, attention_reference_with_lse
from longctx_compiler.testing import EXACT_RTOL, assert_exact, make_tensor, relative_error, strategies
from attention_helpers import NAMES, assert_grads_exact, assert_out_and_grads_exact, cpu_path, out_and_grads


@st.composite
def variant_cases(draw, max_len: int = 28):
    T = draw(strategies.sequence_lengths(1, max_len))
    # Top-left alignment for any S: draw S == T most of the time, T != S too.
    S = draw(st.one_of(st.just(T), st.just(T), strategies.sequence_lengths(1, max_len)))
    window = draw(st.one_of(st.just(0), st.integers(1, 4), st.integers(1, max_len + 4)))
    hkv = draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, 2)),
        Hkv=hkv,
        Hq=hkv * draw(st.integers(1, 3)),
        T=T,
        S=S,
        D=draw(st.sampled_from([1, 3, 4, 8])),
        # Chunks below, at and above the window; None: chosen from the shapes at run time.
        chunk=draw(st.one_of(strategies.chunk_sizes(1, 12), st.none())),
        causal=True if window else draw(st.booleans()),
        window=window,
        softcap=draw(st.one_of(st.just(0.0), st.floats(0.2, 5.0))),
        sinks=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.floats(-2.0, -0.05))),
        seed=draw(strategies.seeds()),
    )


def _inputs(c, dtype=torch.float64):
    """q, k, v (values in [-2, 2): scores large enough for the soft-cap to bend) and sinks or None."""
    seed = c["seed"]
    q = make_tensor((c["B"], c["Hq"], c["T"], c["D"]), seed=seed, dtype=dtype, low=-2, high=2, requires_grad=True)
    k = make_tensor((c["B"], c["Hkv"], c["S"], c["D"]), seed=seed + 1, dtype=dtype, low=-2, high=2, requires_grad=True)
    v = make_tensor((c["B"], c["Hkv"], c["S"], c["D"]), seed=seed + 2, dtype=dtype, requires_grad=True)
    sinks = make_tensor((c["Hq"],), seed=seed + 3, dtype=dtype, low=-1, high=2, requires_grad=True) if c["sinks"] else None
    return q, k, v, sinks


def _variants(c, sinks):
    return dict(causal=c["causal"], scale=c["scale"], window=c["window"], softcap=c["softcap"], sinks=sinks)


def _assert_lse_exact(lse, ref):
    """``lse`` is ``-inf`` exactly where the reference's is (rows that see no key under a
    window, without sinks) and float64-exact elsewhere."""
    empty = ref == float("-inf")
    assert torch.equal(lse == float("-inf"), empty)
    assert_exact(lse[~empty], ref[~empty], name="lse")


@settings(deadline=None, max_examples=60)
@given(c=variant_cases(), offload=st.booleans(), kernel=st.booleans())
def test_float64_exact_against_reference(c, offload, kernel):
    q, k, v, sinks = _inputs(c)
    ref = out_and_grads(lambda q, k, v, s: attention_reference(q, k, v, **_variants(c, s)), q, k, v, sinks)
    with cpu_path(kernel):
        got = out_and_grads(
            lambda q, k, v, s: chunked_attention(q, k, v, chunk_size=c["chunk"], offload=offload, **_variants(c, s)),
            q, k, v, sinks,
        )
    assert_out_and_grads_exact(got, ref)


@settings(deadline=None, max_examples=40)
@given(c=variant_cases(), kernel=st.booleans())
def test_functions_lse_and_dsinks_with_lse_cotangent(c, kernel):
    q, k, v, sinks = _inputs(c)
    kw = _variants(c, sinks)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, **kw)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    dout = make_tensor(ref_out.shape, seed=c["seed"] + 4)
    dlse = make_tensor(ref_lse.shape, seed=c["seed"] + 5)
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), leaves)
    plain = dict(kw, sinks=None if sinks is None else sinks.detach())
    with cpu_path(kernel):
        out, lse = chunked_attention_forward(q.detach(), k.detach(), v.detach(), chunk_size=c["chunk"], **plain)
        grads = chunked_attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, chunk_size=c["chunk"],
                                           dlse=dlse, **plain)
    assert len(grads) == len(leaves)
    assert_exact(out, ref_out, name="out")
    # lse includes the sink term: lse = log(exp(sink) + Σ_j exp(s_ij)).
    _assert_lse_exact(lse, ref_lse)
    assert_grads_exact(grads, ref_grads, NAMES[1:])


@settings(deadline=None, max_examples=25)
@given(c=variant_cases(max_len=20), offload=st.booleans())
def test_ops_directly(c, offload):
    """The four ops' schemas: extra arguments at the end, dsinks as the backward's fourth output."""
    q, k, v, sinks = (None if t is None else t.detach() for t in _inputs(c))
    scale = c["scale"] if c["scale"] is not None else c["D"] ** -0.5
    chunk = c["chunk"] or 0
    extra = (c["window"], c["softcap"], sinks)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, **_variants(c, sinks))
    dout = make_tensor(ref_out.shape, seed=c["seed"] + 4)
    ops = torch.ops.longctx
    if offload:
        out, lse, handle = ops.chunked_attention_fwd_offload(q, k, v, c["causal"], scale, chunk, None, *extra)
        grads = ops.chunked_attention_bwd_offload(dout, handle, None, c["Hkv"], c["S"], c["causal"], scale, chunk, *extra)
    else:
        out, lse = ops.chunked_attention_fwd(q, k, v, c["causal"], scale, chunk, None, *extra)
        grads = ops.chunked_attention_bwd(dout, q, k, v, out, lse, None, c["causal"], scale, chunk, *extra)
    assert_exact(out, ref_out, name="out")
    _assert_lse_exact(lse, ref_lse)
    assert len(grads) == 4
    if sinks is None:
        assert grads[3].shape == (0,)
    want = chunked_attention_backward(dout, q, k, v, out, lse, chunk_size=c["chunk"], **dict(_variants(c, sinks), scale=scale))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_old_call_sites_unchanged():
    # Positional calls of the original schemas, and the 3-tuple of the torch backward.
    c = dict(B=1, Hq=2, Hkv=1, T=9, S=9, D=4, seed=1, sinks=False)
    q, k, v, _ = (t if t is None else t.detach() for t in _inputs(c))
    out, lse = torch.ops.longctx.chunked_attention_fwd(q, k, v, True, 0.5, 4)
    dq, dk, dv, dsinks = torch.ops.longctx.chunked_attention_bwd(torch.ones_like(out), q, k, v, out, lse, None, True, 0.5, 4)
    assert dsinks.numel() == 0
    assert len(chunked_attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=True, scale=0.5, chunk_size=4)) == 3


def test_opcheck_with_variants():
    q = make_tensor((1, 2, 7, 4), seed=1, requires_grad=True)
    k = make_tensor((1, 1, 7, 4), seed=2, requires_grad=True)
    v = make_tensor((1, 1, 7, 4), seed=3, requires_grad=True)
    sinks = make_tensor((2,), seed=4, requires_grad=True)
    ops = torch.ops.longctx
    torch.library.opcheck(ops.chunked_attention_fwd.default, (q, k, v, True, 0.5, 3, None, 3, 1.5, sinks))
    torch.library.opcheck(ops.chunked_attention_fwd.default, (q, k, v, True, 0.5, 0, None, 2, 0.0, None))
    out, lse = ops.chunked_attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.5, 3, None, 3, 1.5, sinks.detach())
    dout = make_tensor(out.shape, seed=5)
    for s in (None, sinks.detach()):
        torch.library.opcheck(ops.chunked_attention_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, lse.detach(),
                                                                   True, 0.5, 3, 3, 1.5, s))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.chunked_attention_fwd_offload.default, (q, k, v, True, 0.5, 3, None, 3, 1.5, sinks), test_utils=utils)


# ------------------------------------------------------------------ band skipping
def _visible(i: int, j: int, causal: bool, window: int) -> bool:
    return not causal or (j <= i and (not window or j > i - window))


@settings(deadline=None, max_examples=200)
@given(T=st.integers(0, 30), S=st.integers(0, 30), chunk=st.integers(1, 9), causal=st.booleans(),
       window=st.integers(0, 12), kv_outer=st.booleans())
def test_schedule_is_exactly_the_pairs_that_meet_the_band(T, S, chunk, causal, window, kv_outer):
    window = window if causal else 0
    want = set()
    for qs in range(0, T, chunk):
        for ks in range(0, S, chunk):
            qe, ke = min(qs + chunk, T), min(ks + chunk, S)
            vis = [_visible(i, j, causal, window) for i in range(qs, qe) for j in range(ks, ke)]
            if any(vis):
                want.add((qs, qe, ks, ke))
                assert attn_chunked.pair_needs_mask(qs, qe, ks, ke, causal, window) == (not all(vis))
    got = []
    for (os_, oe), inner in attn_chunked.chunk_schedule(T, S, chunk, causal, kv_outer=kv_outer, window=window):
        got += [(os_, oe, a, b) if not kv_outer else (a, b, os_, oe) for a, b in inner]
    assert len(got) == len(set(got)) and set(got) == want
    # Inner chunks ascend (the forward's merge order, the backward's prefetch order).
    for _, inner in attn_chunked.chunk_schedule(T, S, chunk, causal, kv_outer=kv_outer, window=window):
        assert inner == sorted(inner)


def test_window_cost_is_the_bands_share_of_causal():
    # T = 32K, w = 4K, chunk 512: pairs computed against full causal's (no tensors involved).
    T, w, C = 32768, 4096, 512

    def pairs(window):
        return sum(len(inner) for _, inner in attn_chunked.chunk_schedule(T, T, C, True, window=window))

    full, banded = pairs(0), pairs(w)
    n = T // C
    assert full == n * (n + 1) // 2
    # Each query chunk meets w / C + 1 key chunks (fewer at the start).
    assert banded <= n * (w // C + 1)
    assert banded / full <= 1.2 * (2 * w / T)
    # Auto chunk on the torch path stays within the window's scale.
    q = torch.empty((1, 1, T, 64), device="meta")
    assert attn_chunked.auto_chunk_size(q, q, fast=False, window=w) <= w // 2
    assert attn_chunked.auto_chunk_size(q, q, fast=False, window=16) == attn_chunked.MIN_AUTO_CHUNK


@pytest.mark.parametrize("T, window, chunk", [(300, 128, 64, ), (300, 100, 64), (257, 37, 64), (200, 64, 128), (190, 16, 64)])
@pytest.mark.parametrize("sinks", [False, True])
def test_band_edge_pairs_split_into_kernel_blocks_are_exact(T, window, chunk, sinks):
    # CPU kernel path: a pair the band's edge cuts is computed as sub-blocks (whole ones on
    # ATen's kernel, the diagonal ones masked); windows on and off the sub-block grid, smaller
    # than a chunk (the diagonal pair is cut too) and a ragged last chunk.
    edges = [attn_chunked._edge_blocks(qs, min(qs + chunk, T), ks, min(ks + chunk, T), chunk, window, None)
             for (qs, _), inner in attn_chunked.chunk_schedule(T, T, chunk, True, window=window)
             for ks, ke in inner if attn_chunked.pair_needs_mask(qs, min(qs + chunk, T), ks, ke, True, window)]
    assert edges and all(e is not None for e in edges)
    c = dict(B=2, Hq=4, Hkv=2, T=T, S=T, D=8, sinks=sinks, seed=T + window, causal=True, window=window, softcap=0.0, scale=None)
    q, k, v, s = _inputs(c)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, **_variants(c, s))
    leaves = (q, k, v) if s is None else (q, k, v, s)
    dout = make_tensor(ref_out.shape, seed=3)
    ref_grads = torch.autograd.grad((ref_out * dout).sum(), leaves)
    with cpu_path(True):
        assert attn_chunked.cpu_kernel_applies(q, k, v, causal=True, scale=c["scale"] or 8 ** -0.5, chunk_size=chunk)
        out, lse = chunked_attention_forward(q, k, v, chunk_size=chunk, **_variants(c, s))
        grads = chunked_attention_backward(dout, q, k, v, out, lse, chunk_size=chunk, **_variants(c, s))
    assert_exact(out, ref_out, name="out")
    assert_exact(lse, ref_lse, name="lse")
    assert_grads_exact(grads[: len(leaves)], ref_grads, NAMES[1:])


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("T, window, chunk, p", [(40, 5, 4, 13), (40, 3, 8, 20), (33, 9, 4, 0), (40, 16, 4, 7), (24, 30, 5, 12)])
def test_nan_outside_the_band_never_reaches_skipped_pairs(T, window, chunk, p, offload):
    """A nan in value row ``p``: every query whose band holds ``p`` is nan (the math); every
    query chunk whose pair with ``p``'s key chunk is skipped stays finite, in ``out`` and
    ``dq`` (a computed pair that masks ``p`` would multiply it by 0 and spread the nan); and
    ``dk``/``dv`` of key chunks never paired with a nan query row stay finite."""
    c = dict(B=1, Hq=2, Hkv=1, T=T, S=T, D=4, seed=5, sinks=True)
    q, k, v, sinks = (t.detach() for t in _inputs(c))
    v[0, 0, p, 1] = float("nan")
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    out = chunked_attention(*leaves[:3], causal=True, chunk_size=chunk, window=window, sinks=sinks, offload=offload)
    dq, dk, dv, dsinks = torch.autograd.grad((out * make_tensor(out.shape, seed=9)).sum(), leaves)
    rows = torch.arange(T)
    in_band = (rows >= p) & (rows < p + window)
    nan_rows = torch.isnan(out).any(dim=-1).any(dim=1)[0]
    assert bool(nan_rows[in_band].all())
    computed = {(qs, ks) for (qs, _), inner in attn_chunked.chunk_schedule(T, T, chunk, True, window=window) for ks, _ in inner}
    pc = (p // chunk) * chunk
    for qs in range(0, T, chunk):
        sl = slice(qs, min(qs + chunk, T))
        if (qs, pc) not in computed:
            assert torch.isfinite(out[:, :, sl]).all() and torch.isfinite(dq[:, :, sl]).all(), qs
    for ks in range(0, T, chunk):
        sl = slice(ks, min(ks + chunk, T))
        if not any(nan_rows[qs:qs + chunk].any() for qs in range(0, T, chunk) if (qs, ks) in computed):
            assert torch.isfinite(dk[:, :, sl]).all() and torch.isfinite(dv[:, :, sl]).all(), ks
    # Rows far from p exist in every case, so the check above is not vacuous.
    assert any((qs, pc) not in computed for qs in range(0, T, chunk))


# ------------------------------------------------------------------ sinks and merging
def test_sink_is_added_once_when_merging_partial_key_sets():
    c = dict(B=2, Hq=4, Hkv=2, T=11, S=17, D=4, seed=3, sinks=True)
    q, k, v, sinks = (t.detach() for t in _inputs(c))
    want_out, want_lse = attention_reference_with_lse(q, k, v, causal=False, sinks=sinks)
    m = 6
    parts = [chunked_attention_forward(q, k[:, :, a:b], v[:, :, a:b], causal=False, scale=None, chunk_size=4)
             for a, b in ((0, m), (m, 17))]
    # Parts without sinks, merged, then the sink folded in once.
    o, l = attn_chunked.merge_partial(parts[0][0].clone(), parts[0][1], *parts[1])
    o, l = attn_chunked.fold_sinks(o, l, sinks)
    assert_exact(o, want_out, name="out")
    assert_exact(l, want_lse, name="lse")
    # Or exactly one part computed with the sinks.
    with_sink = chunked_attention_forward(q, k[:, :, :m], v[:, :, :m], causal=False, scale=None, chunk_size=4, sinks=sinks)
    o, l = attn_chunked.merge_partial(with_sink[0].clone(), with_sink[1], *parts[1])
    assert_exact(o, want_out, name="out")
    assert_exact(l, want_lse, name="lse")


def test_rows_without_keys_under_a_window():
    # T > S with a window: rows i >= S - 1 + window see no key: out 0, lse -inf (sink: lse = sink).
    c = dict(B=1, Hq=2, Hkv=1, T=12, S=5, D=4, seed=2, sinks=True)
    q, k, v, sinks = _inputs(c)
    for s in (None, sinks):
        ref = out_and_grads(lambda q, k, v, s: attention_reference(q, k, v, causal=True, window=3, sinks=s), q, k, v, s)
        got = out_and_grads(lambda q, k, v, s: chunked_attention(q, k, v, causal=True, window=3, sinks=s, chunk_size=4), q, k, v, s)
        assert (got[0][:, :, 7:] == 0).all()
        assert_out_and_grads_exact(got, ref)
    out, lse = chunked_attention_forward(q.detach(), k.detach(), v.detach(), causal=True, scale=None, chunk_size=4, window=3)
    assert (lse[:, :, 7:] == float("-inf")).all() and torch.isfinite(lse[:, :, :7]).all()


def test_sink_gradient_formula():
    # dsink_h = -Σ_{b,i} exp(sink_h - lse_{b,h,i}) · (rowsum(dO ⊙ O) - dlse), against autograd.
    c = dict(B=2, Hq=3, Hkv=1, T=9, S=9, D=4, seed=4, sinks=True)
    q, k, v, sinks = _inputs(c)
    out, lse = attention_reference_with_lse(q, k, v, causal=True, window=4, softcap=1.0, sinks=sinks)
    dout, dlse = make_tensor(out.shape, seed=1), make_tensor(lse.shape, seed=2)
    (want,) = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), sinks)
    delta = (dout * out).sum(-1) - dlse
    assert_exact(attn_chunked.sink_grad(lse.detach(), delta.detach(), sinks.detach()), want, name="dsinks")


# ------------------------------------------------------------------ compile and arguments
def test_compile_once_across_two_lengths():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(q, k, v, sinks):
        return chunked_attention(q, k, v, causal=True, chunk_size=None, window=5, softcap=2.0, sinks=sinks).sum(-1)

    compiled = torch.compile(f, backend=counter, dynamic=True)
    for T in (19, 31):
        c = dict(B=1, Hq=4, Hkv=2, T=T, S=T, D=8, seed=T, sinks=True)
        q, k, v, sinks = _inputs(c)
        reference = lambda q, k, v, s: attention_reference(q, k, v, causal=True, window=5, softcap=2.0, sinks=s).sum(-1)  # noqa: E731
        want = out_and_grads(reference, q, k, v, sinks)
        got = out_and_grads(compiled, q, k, v, sinks)
        assert_out_and_grads_exact(got, want, f" T={T}")
    assert counter.frame_count == 1
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(window=-1, causal=True), ValueError, "window"),
        (dict(window=4, causal=False), ValueError, "causal"),
        (dict(window=2.0, causal=True), TypeError, "window"),
        (dict(window=True, causal=True), TypeError, "window"),
        (dict(softcap=-1.0), ValueError, "softcap"),
        (dict(softcap=float("nan")), ValueError, "softcap"),
        (dict(softcap=float("inf")), ValueError, "softcap"),
        (dict(softcap="1"), TypeError, "softcap"),
        (dict(sinks=torch.zeros(3, dtype=torch.float64)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(1, 2, dtype=torch.float64)), ValueError, "sinks"),
        (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks"),
        (dict(sinks=[0.0, 0.0]), TypeError, "sinks"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    q = torch.zeros((1, 2, 4, 8), dtype=torch.float64)
    k = torch.zeros((1, 1, 4, 8), dtype=torch.float64)
    with pytest.raises(exc, match=match):
        chunked_attention(q, k, k.clone(), **kwargs)
    fn_kwargs = dict(dict(causal=False, scale=None, chunk_size=2), **kwargs)
    with pytest.raises(exc, match=match):
        chunked_attention_forward(q, k, k.clone(), **fn_kwargs)
    with pytest.raises(exc, match=match):
        attention_reference(q, k, k.clone(), **dict(dict(causal=False), **kwargs))
