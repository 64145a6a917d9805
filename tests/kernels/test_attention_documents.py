"""Document-aware (packed-sequence) masking in chunked attention (CPU path, ops).

``segment_ids`` ``[B, T]``: query ``i`` sees key ``j`` only inside one document, ANDed with
causal and the window. Every property is stated in float64 against the float64 reference
(``attention_reference`` with the dense same-document mask; autograd of it gives every
gradient), through the public function, the torch forward/backward and the four ops, both
CPU paths (ATen's kernel for one-document pairs, or the generic torch path), plus the chunk
pair classification itself: skipped pairs are really skipped.
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


def packed_ids(B: int, T: int, *, seed: int, cut: float, sorted_ids: bool = True, dtype=torch.int64) -> torch.Tensor:
    """``[B, T]`` document ids: nondecreasing, a new document after each position with
    probability ``cut`` (1-token documents for large ``cut``, documents over many chunks for
    small), each row offset differently; or, unsorted, ids drawn from ``{0, 1, 2}``."""
    g = torch.Generator().manual_seed(seed)
    if not sorted_ids:
        return torch.randint(0, 3, (B, T), generator=g, dtype=dtype)
    starts = torch.rand((B, T), generator=g) < cut
    starts[:, :1] = False
    offset = torch.randint(-3, 4, (B, 1), generator=g)
    return (starts.cumsum(dim=1) + offset).to(dtype)


@st.composite
def document_cases(draw, max_len: int = 28):
    T = draw(strategies.sequence_lengths(1, max_len))
    window = draw(st.one_of(st.just(0), st.just(0), st.integers(1, 4), st.integers(1, max_len + 4)))
    hkv = draw(st.integers(1, 2))
    return dict(
        B=draw(st.integers(1, 2)),
        Hkv=hkv,
        Hq=hkv * draw(st.integers(1, 3)),
        T=T,
        D=draw(st.sampled_from([1, 3, 4, 8])),
        # Chunks below, at and above the documents' lengths; None: chosen at run time.
        chunk=draw(st.one_of(strategies.chunk_sizes(1, 12), st.none())),
        causal=True if window else draw(st.booleans()),
        window=window,
        softcap=draw(st.one_of(st.just(0.0), st.just(0.0), st.floats(0.2, 5.0))),
        sinks=draw(st.booleans()),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 2.0), st.floats(-2.0, -0.05))),
        cut=draw(st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.9])),
        sorted_ids=draw(st.sampled_from([True, True, True, False])),
        id_dtype=draw(st.sampled_from([torch.int32, torch.int64])),
        seed=draw(strategies.seeds()),
    )


def _inputs(c, dtype=torch.float64):
    """q, k, v (values in [-2, 2): scores large enough for the soft-cap to bend), sinks or None, ids."""
    seed, B, T = c["seed"], c["B"], c["T"]
    q = make_tensor((B, c["Hq"], T, c["D"]), seed=seed, dtype=dtype, low=-2, high=2, requires_grad=True)
    k = make_tensor((B, c["Hkv"], T, c["D"]), seed=seed + 1, dtype=dtype, low=-2, high=2, requires_grad=True)
    v = make_tensor((B, c["Hkv"], T, c["D"]), seed=seed + 2, dtype=dtype, requires_grad=True)
    sinks = make_tensor((c["Hq"],), seed=seed + 3, dtype=dtype, low=-1, high=2, requires_grad=True) if c["sinks"] else None
    ids = packed_ids(B, T, seed=seed + 4, cut=c["cut"], sorted_ids=c["sorted_ids"], dtype=c["id_dtype"])
    return q, k, v, sinks, ids


def _variants(c, sinks, ids):
    return dict(causal=c["causal"], scale=c["scale"], window=c["window"], softcap=c["softcap"], sinks=sinks, segment_ids=ids)


# ------------------------------------------------------------------ exactness
@settings(deadline=None, max_examples=60)
@given(c=document_cases(), offload=st.booleans(), kernel=st.booleans())
def test_float64_exact_against_reference(c, offload, kernel):
    q, k, v, sinks, ids = _inputs(c)
    ref = out_and_grads(lambda q, k, v, s: attention_reference(q, k, v, **_variants(c, s, ids)), q, k, v, sinks)
    with cpu_path(kernel):
        got = out_and_grads(
            lambda q, k, v, s: chunked_attention(q, k, v, chunk_size=c["chunk"], offload=offload, **_variants(c, s, ids)),
            q, k, v, sinks,
        )
    assert_out_and_grads_exact(got, ref)


@settings(deadline=None, max_examples=40)
@given(c=document_cases(), kernel=st.booleans())
def test_functions_lse_and_grads_with_lse_cotangent(c, kernel):
    q, k, v, sinks, ids = _inputs(c)
    kw = _variants(c, sinks, ids)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, **kw)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    dout = make_tensor(ref_out.shape, seed=c["seed"] + 5)
    dlse = make_tensor(ref_lse.shape, seed=c["seed"] + 6)
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), leaves)
    plain = dict(kw, sinks=None if sinks is None else sinks.detach())
    with cpu_path(kernel):
        out, lse = chunked_attention_forward(q.detach(), k.detach(), v.detach(), chunk_size=c["chunk"], **plain)
        grads = chunked_attention_backward(dout, q.detach(), k.detach(), v.detach(), out, lse, chunk_size=c["chunk"],
                                           dlse=dlse, **plain)
    assert len(grads) == len(leaves)
    assert_exact(out, ref_out, name="out")
    # Every row sees its own key: no lse is -inf for finite inputs.
    assert torch.isfinite(lse).all()
    assert_exact(lse, ref_lse, name="lse")
    assert_grads_exact(grads, ref_grads, NAMES[1:])


@settings(deadline=None, max_examples=25)
@given(c=document_cases(max_len=20), offload=st.booleans())
def test_ops_directly(c, offload):
    """The four ops' schemas: ``segment_ids`` last, after ``sinks``."""
    q, k, v, sinks, ids = (None if t is None else t.detach() for t in _inputs(c))
    scale = c["scale"] if c["scale"] is not None else c["D"] ** -0.5
    chunk = c["chunk"] or 0
    extra = (c["window"], c["softcap"], sinks, ids)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, **_variants(c, sinks, ids))
    dout = make_tensor(ref_out.shape, seed=c["seed"] + 5)
    ops = torch.ops.longctx
    if offload:
        out, lse, handle = ops.chunked_attention_fwd_offload(q, k, v, c["causal"], scale, chunk, None, *extra)
        grads = ops.chunked_attention_bwd_offload(dout, handle, None, c["Hkv"], c["T"], c["causal"], scale, chunk, *extra)
    else:
        out, lse = ops.chunked_attention_fwd(q, k, v, c["causal"], scale, chunk, None, *extra)
        grads = ops.chunked_attention_bwd(dout, q, k, v, out, lse, None, c["causal"], scale, chunk, *extra)
    assert_exact(out, ref_out, name="out")
    assert_exact(lse, ref_lse, name="lse")
    assert len(grads) == 4
    want = chunked_attention_backward(dout, q, k, v, out, lse, chunk_size=c["chunk"], **dict(_variants(c, sinks, ids), scale=scale))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@settings(deadline=None, max_examples=30)
@given(c=document_cases(), kernel=st.booleans())
def test_each_document_alone(c, kernel):
    """Packed attention equals attention over each document's slice alone, concatenated
    (sorted ids: a document is a contiguous run), outputs and every gradient."""
    c = dict(c, sorted_ids=True)
    q, k, v, sinks, ids = _inputs(c)
    kw = dict(causal=c["causal"], scale=c["scale"], window=c["window"], softcap=c["softcap"])

    def separately(q, k, v, s):
        rows = []
        for b in range(c["B"]):
            bounds = torch.unique_consecutive(ids[b], return_counts=True)[1].cumsum(0).tolist()
            parts = [attention_reference(q[b:b + 1, :, a:e], k[b:b + 1, :, a:e], v[b:b + 1, :, a:e], sinks=s, **kw)
                     for a, e in zip([0] + bounds[:-1], bounds)]
            rows.append(torch.cat(parts, dim=2))
        return torch.cat(rows, dim=0)

    ref = out_and_grads(separately, q, k, v, sinks)
    with cpu_path(kernel):
        got = out_and_grads(lambda q, k, v, s: chunked_attention(q, k, v, chunk_size=c["chunk"], sinks=s, segment_ids=ids, **kw),
                             q, k, v, sinks)
    assert_out_and_grads_exact(got, ref)


@pytest.mark.parametrize("kernel", [False, True])
def test_one_document_is_the_unmasked_op(kernel):
    """Ids that are one document in every row change nothing: the same pairs, the same kernels."""
    c = dict(B=2, Hq=4, Hkv=2, T=37, D=8, seed=3, sinks=True, cut=0.0, sorted_ids=True, id_dtype=torch.int32)
    q, k, v, sinks, ids = (t.detach() for t in _inputs(c))
    for chunk in (8, None):
        with cpu_path(kernel):
            want = chunked_attention_forward(q, k, v, causal=True, scale=None, chunk_size=chunk, sinks=sinks)
            got = chunked_attention_forward(q, k, v, causal=True, scale=None, chunk_size=chunk, sinks=sinks, segment_ids=ids)
        if chunk is not None:
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        else:
            assert_exact(got[0], want[0], name="out")


# ------------------------------------------------------------------ pair classification
def test_packed_documents_skip_most_causal_pairs():
    """8 documents of 4 chunks each: only the 10 pairs inside each document are computed,
    80 of the 528 causal pairs (skipped: 0.85); ignoring the documents would skip none."""
    C, n_docs, per_doc = 16, 8, 4
    T = C * n_docs * per_doc
    ids = torch.arange(n_docs).repeat_interleave(C * per_doc).unsqueeze(0).expand(2, T)
    docs = attn_chunked.Documents(ids, C)

    def pairs(documents, kv_outer=False):
        return {(o, i) for (o, _), inner in attn_chunked.chunk_schedule(T, T, C, True, kv_outer=kv_outer, documents=documents)
                for i, _ in inner}

    causal, packed = pairs(None), pairs(docs)
    assert len(causal) == 32 * 33 // 2
    assert 1 - len(packed) / len(causal) >= 0.8
    assert len(packed) == n_docs * per_doc * (per_doc + 1) // 2
    assert {(i, o) for o, i in pairs(docs, kv_outer=True)} == packed
    # Pairs inside one document need no document mask: the diagonal ones only the causal one.
    for qs, ks in packed:
        assert attn_chunked.pair_needs_mask(qs, qs + C, ks, ks + C, True, 0, docs) == (qs == ks)
    # A second row whose boundaries sit mid-chunk: the union of both rows' pairs is computed.
    shifted = torch.stack([ids[0], torch.roll(ids[0], C // 2)])
    both = pairs(attn_chunked.Documents(shifted, C))
    assert packed < both and 1 - len(both) / len(causal) >= 0.7


@settings(deadline=None, max_examples=150)
@given(T=st.integers(1, 30), chunk=st.integers(1, 9), causal=st.booleans(), window=st.integers(0, 12),
       B=st.integers(1, 2), cut=st.sampled_from([0.0, 0.1, 0.3, 0.8]), sorted_ids=st.booleans(),
       kv_outer=st.booleans(), seed=strategies.seeds())
def test_schedule_classifies_pairs_by_documents(T, chunk, causal, window, B, cut, sorted_ids, kv_outer, seed):
    """Skipped pairs hold no visible same-document (query, key); unmasked pairs hold only such
    ones; and for sorted ids without a window every computed pair holds one (tight)."""
    window = window if causal else 0
    ids = packed_ids(B, T, seed=seed, cut=cut, sorted_ids=sorted_ids)
    docs = attn_chunked.Documents(ids, chunk)
    i = torch.arange(T).view(T, 1)
    j = torch.arange(T).view(1, T)
    band = (j <= i) & (j > i - window) if window else (j <= i if causal else torch.ones(T, T, dtype=torch.bool))
    keep = band & (ids[:, :, None] == ids[:, None, :])
    computed = set()
    for (os_, oe), inner in attn_chunked.chunk_schedule(T, T, chunk, causal, kv_outer=kv_outer, window=window, documents=docs):
        computed |= {(os_, oe, a, b) if not kv_outer else (a, b, os_, oe) for a, b in inner}
    for qs in range(0, T, chunk):
        for ks in range(0, T, chunk):
            qe, ke = min(qs + chunk, T), min(ks + chunk, T)
            block = keep[:, qs:qe, ks:ke]
            if (qs, qe, ks, ke) not in computed:
                assert not block.any()
                continue
            if not attn_chunked.pair_needs_mask(qs, qe, ks, ke, causal, window, docs):
                assert block.all()
            if sorted_ids and not window:
                assert block.any()
    # Every diagonal pair is computed: each row sees at least its own key.
    assert all((s, min(s + chunk, T), s, min(s + chunk, T)) in computed for s in range(0, T, chunk))


@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("kernel", [False, True])
def test_nan_in_one_document_never_reaches_skipped_pairs(kernel, offload):
    """A nan in a value row of one document: that document's later queries are nan (the
    math); every query chunk whose pair with the nan row's chunk is skipped stays finite in
    ``out`` and ``dq`` (a computed pair that masks the row would spread ``0·nan``), and so do
    ``dk``/``dv`` of key chunks never paired with a nan query row."""
    C, T, p = 4, 40, 13
    lengths = [6, 11, 3, 12, 8]  # boundaries mid-chunk; p = 13 lies in the second document [6, 17)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).unsqueeze(0)
    c = dict(B=1, Hq=2, Hkv=1, T=T, D=4, seed=5, sinks=True, cut=0.0, sorted_ids=True, id_dtype=torch.int64)
    q, k, v, sinks, _ = (t.detach() for t in _inputs(c))
    v[0, 0, p, 1] = float("nan")
    leaves = [t.requires_grad_() for t in (q, k, v, sinks)]
    with cpu_path(kernel):
        out = chunked_attention(*leaves[:3], causal=True, chunk_size=C, sinks=sinks, segment_ids=ids, offload=offload)
        dq, dk, dv, _ = torch.autograd.grad((out * make_tensor(out.shape, seed=9)).sum(), leaves)
    nan_rows = torch.isnan(out).any(dim=-1).any(dim=1)[0]
    assert bool(nan_rows[p:17].all())
    docs = attn_chunked.Documents(ids, C)
    computed = {(qs, ks) for (qs, _), inner in attn_chunked.chunk_schedule(T, T, C, True, documents=docs) for ks, _ in inner}
    pc = (p // C) * C
    skipped = [qs for qs in range(0, T, C) if (qs, pc) not in computed]
    # Query chunks after the second document exist: the check is not vacuous.
    assert any(qs > pc for qs in skipped)
    for qs in skipped:
        assert torch.isfinite(out[:, :, qs:qs + C]).all() and torch.isfinite(dq[:, :, qs:qs + C]).all(), qs
    for ks in range(0, T, C):
        if not any(nan_rows[qs:qs + C].any() for qs in range(0, T, C) if (qs, ks) in computed):
            assert torch.isfinite(dk[:, :, ks:ks + C]).all() and torch.isfinite(dv[:, :, ks:ks + C]).all(), ks


# ------------------------------------------------------------------ compile, opcheck, arguments
def test_compile_once_across_two_lengths():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    kw = dict(causal=True, window=9, softcap=2.0)

    def f(q, k, v, sinks, ids):
        # Literal variants: a float read from a closure would become a symbolic input.
        return chunked_attention(q, k, v, causal=True, chunk_size=None, window=9, softcap=2.0, sinks=sinks, segment_ids=ids).sum(-1)

    compiled = torch.compile(f, backend=counter, dynamic=True)
    for T in (19, 31):
        c = dict(B=2, Hq=4, Hkv=2, T=T, D=8, seed=T, sinks=True, cut=0.2, sorted_ids=True, id_dtype=torch.int64)
        q, k, v, sinks, ids = _inputs(c)
        reference = lambda q, k, v, s: attention_reference(q, k, v, sinks=s, segment_ids=ids, **kw).sum(-1)  # noqa: E731
        want = out_and_grads(reference, q, k, v, sinks)
        got = out_and_grads(lambda q, k, v, s: compiled(q, k, v, s, ids), q, k, v, sinks)
        assert_out_and_grads_exact(got, want, f" T={T}")
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_opcheck_with_documents():
    q = make_tensor((2, 2, 7, 4), seed=1, requires_grad=True)
    k = make_tensor((2, 1, 7, 4), seed=2, requires_grad=True)
    v = make_tensor((2, 1, 7, 4), seed=3, requires_grad=True)
    sinks = make_tensor((2,), seed=4, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [5, 5, 5, 5, 5, 5, 6]], dtype=torch.int32)
    ops = torch.ops.longctx
    torch.library.opcheck(ops.chunked_attention_fwd.default, (q, k, v, True, 0.5, 3, None, 3, 1.5, sinks, ids))
    torch.library.opcheck(ops.chunked_attention_fwd.default, (q, k, v, False, 0.5, 0, None, 0, 0.0, None, ids))
    out, lse = ops.chunked_attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.5, 3, None, 3, 1.5, sinks.detach(), ids)
    dout = make_tensor(out.shape, seed=5)
    torch.library.opcheck(ops.chunked_attention_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, lse.detach(),
                                                               True, 0.5, 3, 3, 1.5, sinks.detach(), ids))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.chunked_attention_fwd_offload.default, (q, k, v, True, 0.5, 3, None, 3, 1.5, sinks, ids), test_utils=utils)


@pytest.mark.parametrize(
    "ids, S, exc, match",
    [
        (torch.zeros(1, 4, dtype=torch.float32), 4, ValueError, "int32 or int64"),
        (torch.zeros(1, 4, dtype=torch.bool), 4, ValueError, "int32 or int64"),
        (torch.zeros(1, 4, dtype=torch.int16), 4, ValueError, "int32 or int64"),
        (torch.zeros(4, dtype=torch.int64), 4, ValueError, r"shape \[B, T\]"),
        (torch.zeros(1, 5, dtype=torch.int64), 4, ValueError, r"shape \[B, T\]"),
        (torch.zeros(2, 4, dtype=torch.int64), 4, ValueError, r"shape \[B, T\]"),
        (torch.zeros(1, 4, dtype=torch.int64, device="meta"), 4, ValueError, "device"),
        (torch.zeros(1, 4, dtype=torch.int64), 6, ValueError, "self-attention"),
        ([[0, 0, 1, 1]], 4, TypeError, "segment_ids"),
    ],
)
def test_bad_segment_ids(ids, S, exc, match):
    q = torch.zeros((1, 2, 4, 8), dtype=torch.float64)
    k = torch.zeros((1, 1, S, 8), dtype=torch.float64)
    with pytest.raises(exc, match=match):
        chunked_attention(q, k, k.clone(), causal=True, segment_ids=ids)
    with pytest.raises(exc, match=match):
        chunked_attention_forward(q, k, k.clone(), causal=True, scale=None, chunk_size=2, segment_ids=ids)
    with pytest.raises(exc, match=match):
        attention_reference(q, k, k.clone(), causal=True, segment_ids=ids)


# ------------------------------------------------------------------ key ids (padding)
PAD = -1


def pad_key_ids(ids: torch.Tensor, kind: str, n: int, *, seed: int) -> torch.Tensor:
    """Key ids: the query ids with ``n`` positions per row set to ``PAD``: the last ``n``
    (``right``), the first ``n`` (``left``), or ``n`` drawn positions (``holes``); ``none``
    leaves them equal."""
    keys = ids.clone()
    B, T = ids.shape
    n = min(n, T)
    if kind == "right" and n:
        keys[:, T - n:] = PAD
    elif kind == "left" and n:
        keys[:, :n] = PAD
    elif kind == "holes":
        g = torch.Generator().manual_seed(seed)
        for b in range(B):
            keys[b, torch.randperm(T, generator=g)[:n]] = PAD
    return keys


@st.composite
def padded_cases(draw, max_len: int = 28):
    c = draw(document_cases(max_len))
    return dict(c, pad=draw(st.sampled_from(["right", "left", "holes", "none"])), n_pad=draw(st.integers(0, c["T"])),
                key_dtype=draw(st.sampled_from([torch.int32, torch.int64])), zeros=draw(st.booleans()))


def _padded_inputs(c, dtype=torch.float64):
    """As :func:`_inputs`, plus key ids; ``zeros``: query ids all 0 (a plain padding mask)."""
    q, k, v, sinks, ids = _inputs(c, dtype)
    if c["zeros"]:
        ids = torch.zeros_like(ids)
    keys = pad_key_ids(ids, c["pad"], c["n_pad"], seed=c["seed"] + 8).to(c["key_dtype"])
    return q, k, v, sinks, ids, keys


def _padded_variants(c, sinks, ids, keys):
    return dict(_variants(c, sinks, ids), key_segment_ids=keys)


def _dense_keep(c, ids, keys):
    """``[B, 1, T, T]`` boolean: what query ``i`` sees (ids, causal, window), for SDPA."""
    T = ids.shape[1]
    i, j = torch.arange(T).view(T, 1), torch.arange(T).view(1, T)
    band = torch.ones(T, T, dtype=torch.bool)
    if c["causal"]:
        band = (j <= i) & (j > i - c["window"]) if c["window"] else j <= i
    return (band & (ids[:, :, None] == keys[:, None, :])).unsqueeze(1)


@settings(deadline=None, max_examples=60)
@given(c=padded_cases(), offload=st.booleans(), kernel=st.booleans())
def test_key_ids_float64_exact_against_reference(c, offload, kernel):
    q, k, v, sinks, ids, keys = _padded_inputs(c)
    kw = _padded_variants(c, sinks, ids, keys)
    ref = out_and_grads(lambda q, k, v, s: attention_reference(q, k, v, **dict(kw, sinks=s)), q, k, v, sinks)
    with cpu_path(kernel):
        got = out_and_grads(
            lambda q, k, v, s: chunked_attention(q, k, v, chunk_size=c["chunk"], offload=offload, **dict(kw, sinks=s)),
            q, k, v, sinks,
        )
    assert_out_and_grads_exact(got, ref)
    assert all(torch.isfinite(t).all() for t in got)


@settings(deadline=None, max_examples=40)
@given(c=padded_cases(), kernel=st.booleans(), offload=st.booleans())
def test_key_ids_lse_empty_rows_and_ops(c, kernel, offload):
    """The torch forward/backward with an lse cotangent and the four ops: rows that see no
    key give out 0, lse -inf (the sink with sinks), dq 0; everything else is the reference's."""
    q, k, v, sinks, ids, keys = _padded_inputs(c)
    kw = _padded_variants(c, sinks, ids, keys)
    ref_out, ref_lse = attention_reference_with_lse(q, k, v, **kw)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    dout = make_tensor(ref_out.shape, seed=c["seed"] + 5)
    dlse = make_tensor(ref_lse.shape, seed=c["seed"] + 6)
    empty = ~_dense_keep(c, ids, keys).any(-1).expand_as(ref_lse)
    if sinks is None:
        # The reference's lse cotangent through an empty row is nan (logsumexp of nothing): none there.
        dlse = dlse.masked_fill(empty, 0.0)
    ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), leaves)
    q, k, v = (t.detach() for t in (q, k, v))
    plain = dict(kw, sinks=None if sinks is None else sinks.detach())
    with cpu_path(kernel):
        out, lse = chunked_attention_forward(q, k, v, chunk_size=c["chunk"], softmax_nan=True, **plain)
        grads = chunked_attention_backward(dout, q, k, v, out, lse, chunk_size=c["chunk"], dlse=dlse, **plain)
        scale = c["scale"] if c["scale"] is not None else c["D"] ** -0.5
        extra = (c["window"], c["softcap"], plain["sinks"], ids, keys)
        ops = torch.ops.longctx
        if offload:
            o2, l2, handle = ops.chunked_attention_fwd_offload(q, k, v, c["causal"], scale, c["chunk"] or 0, None, *extra)
            g2 = ops.chunked_attention_bwd_offload(dout, handle, dlse, c["Hkv"], c["T"], c["causal"], scale, c["chunk"] or 0, *extra)
        else:
            o2, l2 = ops.chunked_attention_fwd(q, k, v, c["causal"], scale, c["chunk"] or 0, None, *extra)
            g2 = ops.chunked_attention_bwd(dout, q, k, v, o2, l2, dlse, c["causal"], scale, c["chunk"] or 0, *extra)
    assert_exact(out, ref_out, name="out")
    assert torch.equal(lse == float("-inf"), empty if sinks is None else torch.zeros_like(empty))
    assert_exact(lse.masked_fill(empty, 0.0), ref_lse.masked_fill(empty, 0.0), name="lse")
    if sinks is not None:
        assert torch.equal(lse[empty], sinks.detach().view(1, -1, 1).expand_as(lse)[empty])
    assert bool((out[empty] == 0).all()) and bool((grads[0][empty] == 0).all())
    assert_grads_exact(grads, ref_grads, NAMES[1:])
    assert_exact(o2, ref_out, name="op out")
    assert torch.equal(l2 == float("-inf"), lse == float("-inf"))
    assert_grads_exact(g2[:len(leaves)], ref_grads, NAMES[1:], " (op)")


@pytest.mark.parametrize("kernel", [False, True])
@pytest.mark.parametrize("offload", [False, True])
@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("pad", ["right", "left", "holes", "documents"])
def test_padding_matches_sdpa_boolean_mask(pad, window, offload, kernel):
    """The ground truth a padded model is compared with: SDPA with the equivalent boolean mask
    (float64; rows whose mask is all False give out 0 and zero gradients there, torch >= 2.5)."""
    B, Hq, Hkv, T, D = 3, 4, 2, 23, 8
    q = make_tensor((B, Hq, T, D), seed=1, dtype=torch.float64, requires_grad=True)
    k = make_tensor((B, Hkv, T, D), seed=2, dtype=torch.float64, requires_grad=True)
    v = make_tensor((B, Hkv, T, D), seed=3, dtype=torch.float64, requires_grad=True)
    if pad == "documents":
        # Packed documents with padding inside: key id = document id, PAD at the pads.
        ids = torch.tensor([[0] * 7 + [1] * 9 + [2] * 7, [3] * 12 + [4] * 11, [5] * 23])
        keys = ids.clone()
        keys[0, 5:7] = PAD
        keys[0, 14:16] = PAD
        keys[1, 12:15] = PAD  # the second document starts with pads: its first queries see none
        keys[2, 20:] = PAD
    else:
        ids = torch.zeros((B, T), dtype=torch.int64)
        keys = torch.stack([pad_key_ids(ids[:1], pad, n, seed=n)[0] for n in (0, 5, 11)])
    c = dict(causal=True, window=window)
    keep = _dense_keep(c, ids, keys)
    empty = ~keep.any(-1)
    # Left padding and pads that open a document leave rows without a key; right padding
    # does only with a window (the pads' own queries a window past the last real key).
    if pad in ("left", "documents"):
        assert bool(empty.any())
    if pad == "right":
        assert bool(empty.any()) == bool(window)
    leaves = (q, k, v)

    def sdpa(q, k, v, _):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True)

    want = out_and_grads(sdpa, *leaves, None)
    with cpu_path(kernel):
        for chunk in (4, None):
            got = out_and_grads(lambda q, k, v, _: chunked_attention(q, k, v, causal=True, chunk_size=chunk, window=window,
                                                                     offload=offload, segment_ids=ids, key_segment_ids=keys),
                                *leaves, None)
            assert_out_and_grads_exact(got, want, f" chunk={chunk}")
            rows = empty.expand(B, Hq, T)
            assert bool((got[0][rows] == 0).all()) and bool((got[1][rows] == 0).all())


@pytest.mark.parametrize("kernel", [False, True])
def test_key_ids_none_is_bit_identical(kernel):
    """``key_segment_ids=None`` is the keys-read-segment_ids path: equal to passing a copy of
    ``segment_ids``, bit for bit, outputs, lse and every gradient (and the same pairs)."""
    for idx, (T, chunk, window, softcap) in enumerate([(37, 8, 0, 0.0), (29, None, 5, 1.5), (16, 4, 0, 0.0)]):
        c = dict(B=2, Hq=4, Hkv=2, T=T, D=8, seed=idx, sinks=True, cut=0.2, sorted_ids=True, id_dtype=torch.int64)
        q, k, v, sinks, ids = (t.detach() for t in _inputs(c))
        kw = dict(causal=True, scale=None, chunk_size=chunk, window=window, softcap=softcap, sinks=sinks, segment_ids=ids)
        dout = make_tensor(q.shape, seed=3)
        results = []
        with cpu_path(kernel):
            for keys in (None, ids.clone()):
                out, lse = chunked_attention_forward(q, k, v, softmax_nan=True, key_segment_ids=keys, **kw)
                grads = chunked_attention_backward(dout, q, k, v, out, lse, key_segment_ids=keys, **kw)
                results.append((out, lse, *grads))
        for a, b in zip(*results):
            assert torch.equal(a, b)


def _brute_rows_see_keys(ids, keys, causal, window):
    c = dict(causal=causal, window=window)
    return _dense_keep(c, ids, keys)[:, 0].any(-1)


@settings(deadline=None, max_examples=150)
@given(T=st.integers(1, 30), B=st.integers(1, 3), causal=st.booleans(), window=st.integers(0, 6),
       n_ids=st.integers(1, 4), seed=strategies.seeds())
def test_rows_see_keys_is_exact(T, B, causal, window, n_ids, seed):
    """``chunked.rows_see_keys`` (sort/searchsorted) equals the dense definition for any ids."""
    window = window if causal else 0
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(-1, n_ids, (B, T), generator=g)
    keys = torch.randint(-1, n_ids, (B, T), generator=g).to(torch.int32)
    want = _brute_rows_see_keys(ids, keys, causal, window)
    assert torch.equal(attn_chunked.rows_see_keys(ids, keys, causal, window), want)
    assert bool(attn_chunked.rows_see_keys(ids, None, causal, window).all())


@pytest.mark.parametrize("window", [0, 4])
def test_rows_see_keys_op_refuses_left_padding(window):
    check = torch.ops.longctx.attention_rows_see_keys
    ids = torch.zeros((2, 9), dtype=torch.int64)
    right = ids.clone()
    right[0, 6:] = PAD
    right[1, 8:] = PAD
    got = check(ids, right, True, window)
    assert torch.equal(got, right) and got.data_ptr() != right.data_ptr()
    # Packed documents padded at their ends pass too; documents with pads first do not.
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2]])
    keys = docs.masked_fill(torch.tensor([[0, 0, 1, 0, 0, 0, 1, 0, 1]], dtype=torch.bool), PAD)
    assert torch.equal(check(docs, keys, True, window), keys)
    left = ids.clone()
    left[1, :2] = PAD
    with pytest.raises(RuntimeError, match="left padding"):
        check(ids, left, True, window)
    with pytest.raises(RuntimeError, match="attn_implementation='sdpa'"):
        # Document 1 starts with a pad: its first query sees no key.
        check(docs, torch.tensor([[0, 0, 0, PAD, 1, 1, 1, 2, 2]]), True, window)
    if window:
        # Holes of at least a window's width leave the rows after them without a key.
        holes = ids.clone()
        holes[0, 2:2 + window] = PAD
        with pytest.raises(RuntimeError, match="left padding"):
            check(ids, holes, True, window)
        assert torch.equal(check(ids, holes, True, 0), holes)
    # Without causal a row sees a key whenever its id occurs among the keys at all.
    assert torch.equal(check(ids, left, False, 0), left)
    with pytest.raises(RuntimeError):
        check(ids, torch.full_like(ids, PAD), False, 0)


def test_rows_see_keys_op_compiles_and_checks():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")

    def f(ids, keys):
        return torch.ops.longctx.attention_rows_see_keys(ids, keys, True, 0) + 1

    compiled = torch.compile(f, backend=counter, dynamic=True)
    for T in (7, 12):
        ids = torch.zeros((2, T), dtype=torch.int64)
        keys = ids.clone()
        keys[:, T - 3:] = PAD
        assert torch.equal(compiled(ids, keys), keys + 1)
        keys[:, 0] = PAD
        with pytest.raises(RuntimeError, match="left padding"):
            compiled(ids, keys)
    assert counter.frame_count == 1
    torch._dynamo.reset()
    ids = torch.zeros((2, 5), dtype=torch.int32)
    torch.library.opcheck(torch.ops.longctx.attention_rows_see_keys.default, (ids, ids.clone(), True, 2))


@pytest.mark.parametrize(
    "ids, keys, exc, match",
    [
        (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.float32), ValueError, "key_segment_ids must be int32 or int64"),
        (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 5, dtype=torch.int64), ValueError, r"key_segment_ids must have shape"),
        (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), ValueError, r"key_segment_ids must have shape"),
        (torch.zeros(1, 4, dtype=torch.int64), [[0, 0, 0, 0]], TypeError, "key_segment_ids"),
        (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64, device="meta"), ValueError, "device"),
        (None, torch.zeros(1, 4, dtype=torch.int64), ValueError, "key_segment_ids need segment_ids"),
    ],
)
def test_bad_key_segment_ids(ids, keys, exc, match):
    q = torch.zeros((1, 2, 4, 8), dtype=torch.float64)
    k = torch.zeros((1, 1, 4, 8), dtype=torch.float64)
    with pytest.raises(exc, match=match):
        chunked_attention(q, k, k.clone(), causal=True, segment_ids=ids, key_segment_ids=keys)
    with pytest.raises(exc, match=match):
        chunked_attention_forward(q, k, k.clone(), causal=True, scale=None, chunk_size=2, segment_ids=ids, key_segment_ids=keys)
    with pytest.raises(exc, match=match):
        attention_reference(q, k, k.clone(), causal=True, segment_ids=ids, key_segment_ids=keys)


@pytest.mark.parametrize(
    "ids, keys, causal, window, exc",
    [
        (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 5, dtype=torch.int64), True, 0, ValueError),
        (torch.zeros(1, 4, dtype=torch.float32), torch.zeros(1, 4, dtype=torch.int64), True, 0, ValueError),
        (torch.zeros(1, 4, dtype=torch.int64), torch.zeros(1, 4, dtype=torch.int64), False, 2, ValueError),
    ],
)
def test_rows_see_keys_op_bad_inputs(ids, keys, causal, window, exc):
    with pytest.raises(exc):
        torch.ops.longctx.attention_rows_see_keys(ids, keys, causal, window)


@settings(deadline=None, max_examples=100)
@given(T=st.integers(1, 30), chunk=st.integers(1, 9), causal=st.booleans(), window=st.integers(0, 12),
       B=st.integers(1, 2), cut=st.sampled_from([0.0, 0.1, 0.3]), pad=st.sampled_from(["right", "left", "holes"]),
       n_pad=st.integers(0, 30), kv_outer=st.booleans(), seed=strategies.seeds())
def test_schedule_classifies_pairs_by_key_ids(T, chunk, causal, window, B, cut, pad, n_pad, kv_outer, seed):
    """With key ids the query side of a pair is classified by the query ids, the key side by
    the key ids: skipped pairs hold no visible (query, key), unmasked ones only visible ones;
    chunks of pads only are never paired."""
    window = window if causal else 0
    ids = packed_ids(B, T, seed=seed, cut=cut).clamp_min(0)
    keys = pad_key_ids(ids, pad, n_pad, seed=seed)
    docs = attn_chunked.Documents(ids, chunk, keys)
    keep = _dense_keep(dict(causal=causal, window=window), ids, keys)[:, 0]
    computed = set()
    for (os_, oe), inner in attn_chunked.chunk_schedule(T, T, chunk, causal, kv_outer=kv_outer, window=window, documents=docs):
        computed |= {(os_, oe, a, b) if not kv_outer else (a, b, os_, oe) for a, b in inner}
    for qs in range(0, T, chunk):
        for ks in range(0, T, chunk):
            qe, ke = min(qs + chunk, T), min(ks + chunk, T)
            block = keep[:, qs:qe, ks:ke]
            if (qs, qe, ks, ke) not in computed:
                assert not block.any()
            elif not attn_chunked.pair_needs_mask(qs, qe, ks, ke, causal, window, docs):
                assert block.all()
            if bool((keys[:, ks:ke] == PAD).all()):
                assert (qs, qe, ks, ke) not in computed


def test_compile_once_across_two_lengths_with_key_ids():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    kw = dict(causal=True, window=9, softcap=2.0)

    def f(q, k, v, sinks, ids, keys):
        return chunked_attention(q, k, v, causal=True, chunk_size=None, window=9, softcap=2.0, sinks=sinks, segment_ids=ids,
                                 key_segment_ids=keys).sum(-1)

    compiled = torch.compile(f, backend=counter, dynamic=True)
    for T in (19, 31):
        c = dict(B=2, Hq=4, Hkv=2, T=T, D=8, seed=T, sinks=True, cut=0.2, sorted_ids=True, id_dtype=torch.int64,
                 zeros=False, pad="left", n_pad=4, key_dtype=torch.int64)
        q, k, v, sinks, ids, keys = _padded_inputs(c)
        reference = lambda q, k, v, s: attention_reference(q, k, v, sinks=s, segment_ids=ids, key_segment_ids=keys,  # noqa: E731
                                                           **kw).sum(-1)
        want = out_and_grads(reference, q, k, v, sinks)
        got = out_and_grads(lambda q, k, v, s: compiled(q, k, v, s, ids, keys), q, k, v, sinks)
        assert_out_and_grads_exact(got, want, f" T={T}")
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_opcheck_with_key_ids():
    q = make_tensor((2, 2, 7, 4), seed=1, requires_grad=True)
    k = make_tensor((2, 1, 7, 4), seed=2, requires_grad=True)
    v = make_tensor((2, 1, 7, 4), seed=3, requires_grad=True)
    sinks = make_tensor((2,), seed=4, requires_grad=True)
    ids = torch.tensor([[0, 0, 1, 1, 1, 2, 2], [0] * 7], dtype=torch.int32)
    keys = torch.tensor([[-1, 0, 1, 1, -1, 2, 2], [-1, -1, 0, 0, 0, 0, -1]], dtype=torch.int64)
    ops = torch.ops.longctx
    torch.library.opcheck(ops.chunked_attention_fwd.default, (q, k, v, True, 0.5, 3, None, 3, 1.5, sinks, ids, keys))
    torch.library.opcheck(ops.chunked_attention_fwd.default, (q, k, v, True, 0.5, 0, None, 0, 0.0, None, ids, keys))
    out, lse = ops.chunked_attention_fwd(q.detach(), k.detach(), v.detach(), True, 0.5, 3, None, 3, 1.5, sinks.detach(), ids, keys)
    dout = make_tensor(out.shape, seed=5)
    torch.library.opcheck(ops.chunked_attention_bwd.default, (dout, q.detach(), k.detach(), v.detach(), out, lse, None,
                                                               True, 0.5, 3, 3, 1.5, sinks.detach(), ids, keys))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(ops.chunked_attention_fwd_offload.default, (q, k, v, True, 0.5, 3, None, 3, 1.5, sinks, ids, keys),
                          test_utils=utils)
