"""The causal-mask prover: proves causal masks for every length, refuses everything else.

Every mask here is traced by Dynamo with a dynamic length (the spellings the pass sees).
Refusals are checked by their reason; proofs of masks that are *not* causal are the bug this
file exists to catch (issue 14: a size-1 ``arange`` broadcast over the queries was read as if
it varied; ``x.bool()`` of a boolean read as all-True).
"""

import operator

import pytest
import torch
import torch.nn.functional as F

from longctx_compiler.passes.analysis.causal_mask import MASKED_THRESHOLD, NotProvable, mask_inputs, prove_causal, prove_mask
from longctx_compiler.passes.analysis.fx_utils import example_value

F64 = torch.float64
NEG = torch.finfo(F64).min


def capture(fn, *args, output=0):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() >= 2:
            torch._dynamo.mark_dynamic(a, 1)
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm,) = graphs
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    return outs[output]


def prove(fn, *args, additive=None):
    """Trace ``fn`` (first output is the mask) and prove it; additive by its dtype."""
    mask = capture(fn, *(args or (X,)))
    if additive is None:
        additive = example_value(mask).dtype != torch.bool
    prove_causal(mask, additive=additive)


def causal_reference(t):
    return torch.ones(t, t, dtype=torch.bool).tril()


def assert_really_causal(fn, additive, lengths=(1, 2, 3, 7, 16)):
    """The eager values agree with the proof (a proof that is wrong is the worst bug)."""
    for t in lengths:
        m = fn(torch.zeros(2, t))[0]
        m = m.broadcast_to(m.shape[:-2] + (t, t)) if m.dim() >= 2 else m
        ref = causal_reference(t).expand_as(m)
        if additive:
            assert bool(((m == 0) == ref).all()) and bool((m[~ref] <= MASKED_THRESHOLD).all())
        else:
            assert torch.equal(m, ref)


def hf_style(x, offset=0, cmp="le", big=NEG):
    t = x.shape[1]
    q_idx = torch.arange(t) + offset
    kv_idx = torch.arange(t) + 0
    qi = q_idx[None, None, :, None]
    ki = kv_idx[None, None, None, :]
    keep = {"le": ki <= qi, "lt": ki < qi, "ge_rev": qi >= ki}[cmp]
    keep = keep.expand(x.shape[0], -1, t, t)
    return (torch.where(keep, torch.zeros((), dtype=torch.float64), big),)


def hf_packed(x, prepend_gap=1, le=operator.le, pos_offset=0, additive=False):
    """transformers 5.x masking_utils with use_cache=False (what Trainer/TRL/checkpointing
    run): packed-sequence detection on the positions, then an and_masks of index gathers."""
    b, t = x.shape
    position_ids = (torch.arange(t) + pos_offset).unsqueeze(0)
    expanded = position_ids.expand(b, -1)
    first = expanded[:, :1] - prepend_gap
    packed = (torch.diff(expanded, prepend=first, dim=-1) != 1).cumsum(-1)
    pos = position_ids.expand(b, -1)
    batch_indices = torch.arange(b)[:, None, None, None]
    q = (torch.arange(t) + 0)[None, None, :, None]
    kv = (torch.arange(t) + 0)[None, None, None, :]
    keep = q.new_ones((), dtype=torch.bool)
    keep = keep & le(pos[batch_indices, kv], pos[batch_indices, q]).to("cpu")
    keep = keep & (packed[batch_indices, q] == packed[batch_indices, kv]).to("cpu")
    keep = keep.expand(b, -1, t, t)
    if additive:
        return (torch.where(keep, torch.zeros((), dtype=F64), NEG),)
    return (keep,)


X = torch.zeros(2, 9)


# -- proven -----------------------------------------------------------------------------------


def test_transformers_spelling_is_proven_causal():
    prove(hf_style)
    prove(lambda x: hf_style(x, cmp="ge_rev"))
    prove(lambda x: hf_style(x, big=-float("inf")))


@pytest.mark.parametrize("additive", [False, True])
def test_transformers_use_cache_false_spelling_is_proven(additive):
    # Issue 9: this mask (packed-sequence detection, index gathers, new_ones, and_) was refused
    # on every layer ("built with new_ones"), so Trainer/TRL never got the rewrite.
    fn = lambda x: hf_packed(x, additive=additive)  # noqa: E731
    prove(fn)
    assert_really_causal(fn, additive)
    # positions starting elsewhere still give one document (diff is 1 everywhere)
    prove(lambda x: hf_packed(x, pos_offset=5, additive=additive))


def test_boolean_and_masked_fill_spellings():
    def boolean(x):
        t = x.shape[1]
        i = torch.arange(t).unsqueeze(1)
        j = torch.arange(t).unsqueeze(0)
        return (~(j > i),)

    def filled(x):
        t = x.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        return (torch.zeros(t, t, dtype=torch.float64).masked_fill(j > i, float("-inf")),)

    prove(boolean, additive=False)
    with pytest.raises(NotProvable):
        # a boolean keep-mask read as additive values is not causal masking
        prove(boolean, additive=True)
    prove(filled)


def test_triangular_in_place_and_arithmetic_spellings():
    def triu_additive(x):
        t = x.shape[1]
        return (torch.triu(torch.full((t, t), float("-inf"), dtype=F64), diagonal=1),)

    def tril_bool(x):
        t = x.shape[1]
        return (torch.ones(t, t, dtype=torch.bool).tril(),)

    def old_transformers(x):  # _make_causal_mask of transformers 4.3x: an in-place masked_fill_
        t = x.shape[1]
        mask = torch.full((t, t), NEG, dtype=F64)
        cond = torch.arange(mask.size(-1))
        mask.masked_fill_(cond < (cond + 1).view(mask.size(-1), 1), 0)
        return (mask[None, None, :, :].expand(x.shape[0], 1, t, t),)

    def inverted(x):  # (1 - keep) * min, as _prepare_4d_attention_mask spells it
        t = x.shape[1]
        keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return ((1.0 - keep.to(F64)) * NEG,)

    def transposed(x):
        t = x.shape[1]
        return ((torch.arange(t)[:, None] <= torch.arange(t)[None, :]).transpose(0, 1),)

    for fn in (triu_additive, tril_bool, old_transformers, inverted, transposed):
        prove(fn)
        assert_really_causal(fn, additive=example_value(capture(fn, X)).dtype != torch.bool)


# -- issue 14: size-1 dims ------------------------------------------------------------------------


def test_size_one_arange_broadcast_over_queries_is_refused():
    # keep = j <= 0 for every query: not causal (was "proven" and rewritten: output off by 2.9)
    def expanded(x):
        t = x.shape[1]
        return (torch.arange(t)[None, :] <= torch.arange(1).expand(t)[:, None],)

    def additive(x):
        t = x.shape[1]
        return (torch.where(torch.arange(t)[None, :] <= torch.arange(1)[:, None], 0.0, float("-inf")),)

    def one_row(x):  # a [1, S] mask broadcast over the queries
        t = x.shape[1]
        return ((torch.arange(t)[None, :] <= torch.arange(t)[None, :] - torch.arange(t)[None, :]),)

    for fn in (expanded, additive, one_row):
        with pytest.raises(NotProvable, match="not causal|more than the query-key distance"):
            prove(fn)


def test_size_one_dims_read_at_zero_prove_what_is_true():
    # The same root fix must not refuse what is causal: a size-1 arange used as an offset.
    def offset_by_arange1(x):
        t = x.shape[1]
        return (torch.arange(t)[None, :] <= torch.arange(t)[:, None] + torch.arange(1),)

    prove(offset_by_arange1)
    assert_really_causal(offset_by_arange1, additive=False)


def test_bool_cast_of_a_boolean_is_not_all_true():
    # `.bool()` of a boolean mask was modelled as `Ne(mask, 0)`, which sympy reads as True.
    def never(x):
        t = x.shape[1]
        i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
        return ((j <= i) & (j >= i + 100).bool(),)

    with pytest.raises(NotProvable, match="not causal"):
        prove(never)


# -- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn, words",
    [
        (lambda x: hf_style(x, cmp="lt"), "not causal"),  # strictly-lower: diagonal masked
        (lambda x: hf_style(x, offset=1), "not causal"),  # shifted by one (cache offset)
        (lambda x: hf_style(x, big=-10.0), "adds -10"),  # soft mask: not exact masking
        (lambda x: hf_packed(x, le=operator.lt), "not causal"),
        (lambda x: hf_packed(x, prepend_gap=2), "cumsum"),  # first diff is 2: ids vary
    ],
)
def test_non_causal_masks_are_refused(fn, words):
    with pytest.raises(NotProvable, match=words):
        prove(fn)


def test_inexact_values_are_refused():
    def bf16_positions(x):  # bfloat16 rounds positions above 256: j <= i is wrong there
        t = x.shape[1]
        return (torch.arange(t).bfloat16()[None, :] <= torch.arange(t).bfloat16()[:, None],)

    def nan_mask(x):  # (1 - keep) * -inf is 0 * -inf = nan on the kept scores
        t = x.shape[1]
        keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return ((1.0 - keep.to(F64)) * float("-inf"),)

    def half_min(x):  # float16's finfo.min: a finite value that does not remove a score exactly
        t = x.shape[1]
        keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return (torch.where(keep, 0.0, torch.finfo(torch.float16).min).half(),)

    with pytest.raises(NotProvable, match="bfloat16"):
        prove(bf16_positions)
    with pytest.raises(NotProvable, match="nan"):
        prove(nan_mask)
    with pytest.raises(NotProvable, match="adds -65504"):
        prove(half_min)


def test_in_place_writes_that_cannot_be_followed_are_refused():
    def through_view(x):
        t = x.shape[1]
        m = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        m[0].fill_(True)  # writes row 0 of m through a view
        return (m,)

    def setitem(x):
        t = x.shape[1]
        m = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        m[0, 3] = True
        return (m,)

    def read_before_write(x):
        t = x.shape[1]
        m = torch.zeros(t, t, dtype=F64)
        before = m.clone()
        m.masked_fill_(torch.arange(t)[None, :] > torch.arange(t)[:, None], float("-inf"))
        return (m + before,)

    with pytest.raises(NotProvable, match="through a view"):
        prove(through_view)
    with pytest.raises(NotProvable, match="setitem|in place"):
        prove(setitem)
    with pytest.raises(NotProvable, match="read before"):
        prove(read_before_write)


def test_gathers_with_possibly_negative_indices_are_refused():
    def shifted(x):
        t = x.shape[1]
        pos = torch.arange(t)[None].expand(2, -1)
        b = torch.arange(2)[:, None, None]
        q = (torch.arange(t) - 1)[None, :, None]  # -1 wraps around to the last position
        k = torch.arange(t)[None, None, :]
        return (pos[b, k] <= pos[b, q],)

    with pytest.raises(NotProvable, match="negative"):
        prove(shifted)


def test_sliding_window_and_padding_masks_are_not_causal():
    def window(x):
        t = x.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        keep = (j <= i) & (j > i - 4)
        return (keep,)

    def padding(x, pad):
        t = x.shape[1]
        i = torch.arange(t)[:, None]
        j = torch.arange(t)[None, :]
        return ((j <= i) & pad[:, None, :].bool(),)

    with pytest.raises(NotProvable, match="sliding window of 4 keys, not the causal mask"):
        prove(window, additive=False)
    with pytest.raises(NotProvable, match="padding"):
        prove(padding, X, torch.ones(2, 9), additive=False)


# -- which input a refused mask reads ---------------------------------------------------------------


def test_refusals_name_the_input_by_how_it_is_used():
    # The graph input names are Dynamo's (they change between releases): the role comes from
    # how the input is used; these use neutral names on purpose.
    def padded(x, a):
        t = x.shape[1]
        keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return (keep[None] & a[:, None, :].to(torch.bool),)

    def positions(x, p):
        packed = (torch.diff(p, prepend=p[:, :1] - 1, dim=-1) != 1).cumsum(-1)
        b = torch.arange(2)[:, None, None]
        t = x.shape[1]
        q, k = torch.arange(t)[None, :, None], torch.arange(t)[None, None, :]
        return ((p[b, k] <= p[b, q]) & (packed[b, q] == packed[b, k]),)

    def tokens(x, w, tok):
        t = x.shape[1]
        keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]
        return (keep[None] & (tok != 0)[:, None, :], F.embedding(tok, w))

    class Buffered(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("causal_bias", torch.ones(64, 64, dtype=torch.bool).tril())

        def forward(self, x):
            t = x.shape[1]
            return (self.causal_bias[:t, :t],)

    ids = torch.randint(0, 10, (2, 9))
    cases = [
        (padded, (X, torch.ones(2, 9, dtype=torch.long)), r"attention_mask input \(padding\)"),
        (positions, (X, torch.arange(9)[None].expand(2, -1).clone()), "position_ids passed by the caller"),
        (tokens, (X, torch.randn(10, 4), ids), "token ids"),
        (Buffered(), (X,), "module buffer 'causal_bias'"),
    ]
    for fn, args, words in cases:
        torch._dynamo.reset()
        mask = capture(fn, *args)
        assert mask_inputs(mask)
        with pytest.raises(NotProvable, match=words):
            prove_causal(mask, additive=False)


def test_shape_reads_are_not_value_dependencies():
    # x.size(1), x.new_ones(...): the mask's shape or dtype comes from an input, not its values.
    def shaped(x):
        t = x.size(1)
        keep = x.new_ones((), dtype=torch.bool) & (torch.arange(t)[None, :] <= torch.arange(t)[:, None])
        return (keep,)

    mask = capture(shaped, X)
    assert mask_inputs(mask) == []
    prove_causal(mask, additive=False)


# -- the masks transformers builds (captured from a real model, no compile) -----------------------


def transformers_masks(attn, use_cache, **inputs):
    """The masks the attention ops of a tiny Llama receive, as Dynamo traces them."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=32, max_position_embeddings=64, attn_implementation=attn)
    model = transformers.LlamaForCausalLM(cfg).to(F64).train()
    masks = []

    def backend(gm, example_inputs):
        for n in gm.graph.nodes:
            if n.target in (F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention):
                masks.append(n.kwargs.get("attn_mask", n.args[3] if len(n.args) > 3 else None))
            elif n.target in (F.softmax, torch.softmax, "softmax"):
                scores = n.args[0]  # eager spelling: softmax(q @ kᵀ * s + mask)
                if isinstance(scores, torch.fx.Node) and scores.target is operator.add:
                    masks.append(scores.args[1])
        return gm.forward

    ids = torch.randint(0, 32, (2, 10))
    for t in [ids, *inputs.values()]:
        torch._dynamo.maybe_mark_dynamic(t, 1)
    torch.compile(model, backend=backend)(ids, use_cache=use_cache, **inputs)
    assert masks
    return masks


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_training_masks_are_proven(attn):
    # use_cache=False is how Trainer, TRL and gradient checkpointing call the model.
    for use_cache in (False, True):
        torch._dynamo.reset()
        for mask in transformers_masks(attn, use_cache):
            if mask is None:
                continue  # SDPA with is_causal=True: nothing to prove
            prove_causal(mask, additive=example_value(mask).dtype != torch.bool)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_padding_is_proven_causal_over_the_real_keys(attn):
    pad = torch.ones(2, 10, dtype=torch.long)
    pad[0, 7:] = 0
    (mask,) = transformers_masks(attn, False, attention_mask=pad)
    additive = example_value(mask).dtype != torch.bool
    proof = prove_mask(mask, additive=additive)
    assert proof.window is None and proof.documents is None and proof.key_padding.op == "placeholder"
    with pytest.raises(NotProvable, match="padded keys"):
        prove_causal(mask, additive=additive)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_transformers_caller_positions_are_proven_causal_within_documents(attn):
    # Positions passed by the caller (packed documents): transformers numbers the documents
    # where a position is not its predecessor + 1, and keeps pairs of one document only.
    positions = torch.cat([torch.arange(4), torch.arange(6)])[None].expand(2, -1).clone()
    (mask,) = transformers_masks(attn, False, position_ids=positions)
    additive = example_value(mask).dtype != torch.bool
    proof = prove_mask(mask, additive=additive)
    assert proof.window is None and proof.documents is not None and "cumsum" in str(proof.documents.target)
    # plain causal it is not: a pass that only knows causal masks must refuse it
    with pytest.raises(NotProvable, match="packed documents"):
        prove_causal(mask, additive=additive)


# -- sliding windows -------------------------------------------------------------------------

def band(fn, *args, additive=None):
    """Trace ``fn`` and return :func:`prove_band`'s window."""
    from longctx_compiler.passes.analysis.causal_mask import prove_band

    mask = capture(fn, *(args or (X,)))
    if additive is None:
        additive = example_value(mask).dtype != torch.bool
    return prove_band(mask, additive=additive)


def _ij(x):
    t = x.shape[1]
    return torch.arange(t)[:, None], torch.arange(t)[None, :]


@pytest.mark.parametrize("w", [1, 2, 5, 4096])
def test_windows_are_read_off_the_kept_set(w):
    def transformers_spelling(x):  # sliding_window_overlay & causal: kv > q - w, kv <= q
        i, j = _ij(x)
        return (j > i - w) & (j <= i)

    def inclusive_spelling(x):  # the same band written with >= (one more key: window w + 1)
        i, j = _ij(x)
        return (j >= i - w) & (j <= i)

    def additive_spelling(x):
        i, j = _ij(x)
        return torch.where((i - j < w) & (j <= i), 0.0, float("-inf"))

    def tril_triu(x):
        t = x.shape[1]
        return torch.ones(t, t, dtype=torch.bool).tril().triu(-(w - 1))

    assert band(transformers_spelling) == w
    assert band(inclusive_spelling) == w + 1
    assert band(additive_spelling) == w
    assert band(tril_triu) == w
    with pytest.raises(NotProvable, match=f"sliding window of {w} keys"):
        prove(transformers_spelling)  # the plain causal prover does not accept a band


def test_causal_is_no_window():
    def causal(x):
        i, j = _ij(x)
        return j <= i

    assert band(causal) is None


@pytest.mark.parametrize("name, fn, words", [
    ("a band that looks ahead", lambda i, j: (j > i - 3) & (j <= i + 1), "keeps key - query = 1"),
    ("a band without the diagonal", lambda i, j: (j > i - 3) & (j < i), "differs at key - query = 0"),
    ("a window with a sink token", lambda i, j: ((j > i - 3) | (j == 0)) & (j <= i), "more than the query-key distance"),
    ("two bands", lambda i, j: (j <= i) & ((j > i - 2) | (j <= i - 4)), "differs at key - query = -3"),
    ("no causal side", lambda i, j: j > i - 3, "keeps key - query"),
])
def test_near_miss_bands_are_refused(name, fn, words):
    def mask(x):
        return fn(*_ij(x))

    with pytest.raises(NotProvable, match=words):
        band(mask)


def test_a_window_that_grows_with_the_length_is_refused():
    def mask(x):
        i, j = _ij(x)
        return (j > i - x.shape[1] // 2) & (j <= i)

    with pytest.raises(NotProvable, match="more than the query-key distance"):
        band(mask)


# -- packed documents ---------------------------------------------------------------------------


def packed_mask(x, p, le=operator.le, gap=1, docs_cmp=operator.eq, combine=operator.and_, q_row=None, additive=False, window=None):
    """transformers' use_cache=False mask over caller positions ``p`` (packed documents),
    with knobs that turn it into near misses."""
    b, t = x.shape
    docs = (torch.diff(p, prepend=p[:, :1] - gap, dim=-1) != 1).cumsum(-1)
    bi = torch.arange(b)[:, None, None, None]
    q = torch.arange(t)[None, None, :, None]
    k = torch.arange(t)[None, None, None, :]
    qb = bi if q_row is None else torch.zeros_like(bi) + q_row
    keep = le(p[bi, k], p[qb, q])
    if window is not None:
        keep = keep & (p[bi, k] > p[bi, q] - window)
    keep = combine(x.new_ones((), dtype=torch.bool) & keep, docs_cmp(docs[bi, q], docs[bi, k]))
    keep = keep.expand(b, -1, t, t)
    if additive:
        return (torch.where(keep, torch.zeros((), dtype=torch.float64), NEG),)
    return (keep,)


def _packed_positions(lengths, batch=2):
    return torch.cat([torch.arange(n) for n in lengths])[None].expand(batch, -1).clone()


def _documents_reference(p, window=None):
    """keep[b, i, j]: one document (no position break in (j, i]) and j ≤ i (within the window)."""
    t = p.shape[1]
    breaks = torch.cat([torch.zeros_like(p[:, :1]), (p[:, 1:] - p[:, :-1] != 1).long()], 1).cumsum(1)
    i, j = torch.arange(t)[:, None], torch.arange(t)[None, :]
    keep = (breaks[:, :, None] == breaks[:, None, :]) & (j <= i)
    return keep & (j > i - window) if window else keep


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_packed_document_masks_are_proven_and_agree_with_their_values(additive, window):
    x = torch.zeros(2, 10, dtype=F64)
    fn = lambda x, p: packed_mask(x, p, additive=additive, window=window)  # noqa: E731
    proof = prove_mask(capture(fn, x, _packed_positions([4, 6])), additive=additive)
    assert proof.window == window and proof.documents is not None and proof.document_row is None
    # The proof holds for positions it never saw: rows with different documents, 1-token
    # documents, positions that jump forward or start above 0.
    for p in (_packed_positions([1, 3, 1, 5]), torch.stack([torch.arange(10) + 7, torch.tensor([0, 1, 2, 9, 10, 11, 3, 4, 0, 1])])):
        (m,) = fn(x, p)
        kept = (m == 0) if additive else m
        assert torch.equal(kept[:, 0], _documents_reference(p, window))


@pytest.mark.parametrize("near_miss, words", [
    (dict(le=operator.lt), "not causal"),
    (dict(gap=2), "break at the first token"),
    (dict(docs_cmp=operator.le), "other than by equality"),
    (dict(combine=operator.or_), "different documents"),
    (dict(q_row=0), "positions other than"),
])
def test_packed_document_near_misses_are_refused(near_miss, words):
    torch._dynamo.reset()
    mask = capture(lambda x, p: packed_mask(x, p, **near_miss), torch.zeros(2, 10, dtype=F64), _packed_positions([4, 6]))
    with pytest.raises(NotProvable, match=words):
        prove_mask(mask, additive=False)


def test_a_document_count_that_is_not_position_breaks_is_refused():
    def counts_other_steps(x, p):  # breaks where the step is not 2: not transformers' numbering
        t = x.shape[1]
        docs = (torch.diff(p, prepend=p[:, :1] - 2, dim=-1) != 2).cumsum(-1)
        bi = torch.arange(2)[:, None, None, None]
        q, k = torch.arange(t)[None, None, :, None], torch.arange(t)[None, None, None, :]
        return ((k <= q) & (docs[bi, q] == docs[bi, k]),)

    mask = capture(counts_other_steps, torch.zeros(2, 10, dtype=F64), _packed_positions([4, 6]))
    with pytest.raises(NotProvable, match="does not count steps other than"):
        prove_mask(mask, additive=False)


# -- key padding --------------------------------------------------------------------------------


def padded_mask(x, a, read="key", test="nonzero", combine=operator.and_):
    """A causal mask over the real keys of a padding input ``a [B, T]`` (1 real, 0 padded),
    with knobs that turn it into near misses."""
    b, t = x.shape
    bi = torch.arange(b)[:, None, None, None]
    q = torch.arange(t)[None, None, :, None]
    k = torch.arange(t)[None, None, None, :]
    at = {"key": a[bi, k], "query": a[bi, q], "first": a[bi, torch.zeros_like(k)]}[read]
    real = {"nonzero": at.to(torch.bool), "is_one": at == 1}[test]
    return (combine(k <= q, real).expand(b, -1, t, t),)


def test_key_padding_masks_are_proven_and_agree_with_their_values():
    x, a = torch.zeros(2, 9, dtype=F64), torch.ones(2, 9, dtype=torch.long)
    proof = prove_mask(capture(padded_mask, x, a), additive=False)
    assert proof.key_padding is not None and proof.key_padding_row is None and proof.window is None
    a = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 0, 1, 1, 1]])
    (m,) = padded_mask(x, a)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    assert torch.equal(m[:, 0], (j <= i) & a.bool()[:, None, :])


@pytest.mark.parametrize("near_miss, words", [
    (dict(read="query"), "elsewhere than at the key"),
    (dict(read="first"), "elsewhere than at the key"),
    (dict(test="is_one"), "other than as 'nonzero"),
    (dict(combine=operator.or_), "padded keys"),
])
def test_key_padding_near_misses_are_refused(near_miss, words):
    torch._dynamo.reset()
    mask = capture(lambda x, a: padded_mask(x, a, **near_miss), torch.zeros(2, 9, dtype=F64), torch.ones(2, 9, dtype=torch.long))
    with pytest.raises(NotProvable, match=words):
        prove_mask(mask, additive=False)
