"""Near-miss masks: the causal-mask prover is never wrong, whatever a model writes.

Hypothesis writes small mask programs as Python source (functions of the length ``T``):
aranges with offsets, size-1 aranges broadcast where the queries go, unsqueeze/indexing/
view/expand placements, comparisons, ``&``/``|``/``~``/``where``/``masked_fill``,
``tril``/``triu``, transformers' packed-sequence gathers, slices of stored buffers, additive
forms with ``-inf``/``finfo.min``/finite values in four float dtypes. About half are true
causal masks in some spelling; the rest are one mutation away (an offset, a strict
comparison, a swapped orientation, a size-1 dim, a soft value).

Each batch of programs is traced by Dynamo with a dynamic length (the spellings the pass
sees) and every mask goes to :func:`prove_band`. The judge: a proof must hold on the
program's eager values at T = 1, 2, 3, 7, 16, 33 (kept ⇔ key ≤ query, and for a proven
window ``w`` also key > query − w; additive: 0 where kept, ≤ ``MASKED_THRESHOLD`` where
dropped). Refusals are fine; a wrong proof fails.

Size: ``LONGCTX_FUZZ_EXAMPLES`` mask programs (default 160: about a minute on one loaded
core; ``make fuzz`` runs the nightly size, ≥ 10,000). The figures (proofs, refusals, wrong)
are printed at the end (``pytest -s``) and, with ``LONGCTX_FUZZ_REPORT=path``, appended to
that file as one JSON line.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx_compiler.passes.analysis.causal_mask import MASKED_THRESHOLD, NotProvable, prove_band, prove_causal
from longctx_compiler.passes.analysis.fx_utils import example_value

PROGRAMS = int(os.environ.get("LONGCTX_FUZZ_EXAMPLES", "160"))
BATCH = 8  # programs per Dynamo trace (tracing dominates the cost; the prover takes ~10 ms)
LENGTHS = (1, 2, 3, 7, 16, 33)

# What the programs may read besides torch: a stored index buffer and a stored causal mask
# (graph inputs for Dynamo: a proof must never rely on their current values).
NAMESPACE = {
    "torch": torch,
    "BUF": torch.arange(64),
    "CAUSAL": torch.ones(64, 64, dtype=torch.bool).tril(),
    "NEG_CAUSAL": torch.full((64, 64), float("-inf"), dtype=torch.float64).triu(1),
}

# -- the generator ---------------------------------------------------------------------------

offsets = st.integers(-2, 2)


@st.composite
def index_vector(draw, true_offset=None):
    """A 1-D index vector of length T (or 1), as source. ``true_offset``: an exact
    ``arange(T) + c`` spelling (the causal templates), else any near miss."""
    c = draw(offsets) if true_offset is None else true_offset
    exact = [
        f"(torch.arange(T) + {c})",
        f"torch.arange({c}, T + {c})" if c >= 0 else f"(torch.arange(T) - {-c})",
        f"(torch.arange(T) + {c} + torch.arange(1))",
        f"(torch.arange(T, dtype=torch.float64) + {c})",
        f"(torch.arange(T).unsqueeze(0) + {c})[0]",
    ]
    if true_offset is not None:
        return draw(st.sampled_from(exact))
    near = [
        f"(torch.arange(1) + {c}).expand(T)",  # issue 14: a size-1 arange where queries go
        f"(torch.arange(1) + {c})",
        "torch.zeros(T, dtype=torch.long)",
        f"(torch.arange(T) * 2 + {c})",
        "torch.arange(T).flip(0)",
        "BUF[:T]",
        f"(BUF[:T] + {c})",
        f"(torch.arange(T).to(torch.bfloat16) + {c})",
        "torch.arange(T).to(torch.int16)",
        f"(torch.arange(T) - torch.arange(T))",
    ]
    return draw(st.sampled_from(exact + near))


def as_column(v: str, style: int) -> str:
    return [f"{v}[:, None]", f"{v}.unsqueeze(1)", f"{v}.unsqueeze(-1)", f"{v}.reshape(-1, 1)", f"{v}[..., None]"][style]


def as_row(v: str, style: int) -> str:
    return [f"{v}[None, :]", f"{v}.unsqueeze(0)", f"{v}[None]", f"{v}.reshape(1, -1)", f"{v}.expand(T, -1)"][style]


styles = st.integers(0, 4)
OPS = {"le": "<=", "lt": "<", "ge": ">=", "gt": ">", "eq": "==", "ne": "!="}


def compare(a: str, op: str, b: str, spelling: int) -> str:
    return [f"({a} {OPS[op]} {b})", f"torch.{op}({a}, {b})", f"{a}.{op}({b})"][spelling]


@st.composite
def comparison(draw, causal: bool):
    """``key <= query`` in one of its spellings (causal) or a near miss of it."""
    c = draw(offsets)
    if causal:
        q = draw(index_vector(true_offset=c))
        k = draw(index_vector(true_offset=c))
    else:
        q, k = draw(index_vector()), draw(index_vector())
    col, row = as_column(q, draw(styles)), as_row(k, draw(styles))
    form = draw(st.sampled_from(["k<=q", "q>=k", "~k>q", "~q<k"] if causal else ["k<=q", "q>=k", "~k>q", "~q<k", "k<q", "q<=k", "k==q", "k!=q", "row,row", "col,col"]))
    sp = draw(st.integers(0, 2))
    if form == "k<=q":
        return compare(row, "le", col, sp)
    if form == "q>=k":
        return compare(col, "ge", row, sp)
    if form == "~k>q":
        return f"(~{compare(row, 'gt', col, sp)})"
    if form == "~q<k":
        return f"torch.logical_not({compare(col, 'lt', row, sp)})"
    if form == "k<q":
        return compare(row, "lt", col, sp)
    if form == "q<=k":
        return compare(col, "le", row, sp)
    if form == "k==q":
        return compare(row, "eq", col, sp)
    if form == "k!=q":
        return f"(~{compare(row, 'ne', col, sp)})"
    if form == "row,row":
        return compare(row, "le", as_row(q, draw(styles)), sp)
    return compare(as_column(k, draw(styles)), "le", col, sp)


@st.composite
def triangular(draw, causal: bool):
    k = 0 if causal else draw(st.integers(-1, 1))
    return draw(st.sampled_from([
        f"torch.ones(T, T, dtype=torch.bool).tril({k})",
        f"torch.tril(torch.ones(T, T, dtype=torch.bool), diagonal={k})",
        f"(~torch.ones(T, T, dtype=torch.bool).triu({k + 1}))",
        f"(torch.ones(T, T).tril({k}) > 0)",
    ]))


@st.composite
def packed(draw, causal: bool):
    """transformers 5.x with use_cache=False: packed-sequence ids and index gathers."""
    gap = 1 if causal else draw(st.sampled_from([0, 1, 2]))
    start = draw(st.integers(0, 3))
    pos = draw(st.sampled_from([f"(torch.arange(T) + {start})[None].expand(2, -1)", "BUF[:T][None].expand(2, -1)"] if not causal else [f"(torch.arange(T) + {start})[None].expand(2, -1)"]))
    cmp = "<=" if causal else draw(st.sampled_from(["<=", "<", ">="]))
    q = "(torch.arange(T) + 0)" if causal else draw(st.sampled_from(["(torch.arange(T) + 0)", "(torch.arange(T) - 1)", "torch.arange(1).expand(T)"]))
    return (
        f"(lambda P, b, q, k: x.new_ones((), dtype=torch.bool)"
        f" & (P[b, k] {cmp} P[b, q]).to('cpu')"
        f" & ((lambda ids: ids[b, q] == ids[b, k])((torch.diff(P, prepend=P[:, :1] - {gap}, dim=-1) != 1).cumsum(-1))).to('cpu'))"
        f"({pos}, torch.arange(2)[:, None, None, None], {q}[None, None, :, None], torch.arange(T)[None, None, None, :])"
    )


@st.composite
def keep_mask(draw, causal: bool, depth: int = 2):
    """A boolean keep-mask (rank ≤ 4, dims of size 1 or T)."""
    kind = draw(st.sampled_from(["cmp", "cmp", "cmp", "tri", "packed"] + (["combine"] * 2 if depth else [])))
    if kind == "cmp":
        return draw(comparison(causal))
    if kind == "tri":
        return draw(triangular(causal))
    if kind == "packed":
        return draw(packed(causal))
    # a near miss may start from a causal mask: with "window" and "&" it is a band (a proof
    # must then give its exact window), with anything else one mutation away from one
    a = draw(keep_mask(causal or draw(st.booleans()), depth - 1))
    # combine with something that keeps it causal (causal) or anything (near miss)
    other = draw(st.sampled_from(["ones", "same", "window", "buffer", "cmp"]))
    if causal:
        other = draw(st.sampled_from(["ones", "same", "wide"]))
    b = {
        "ones": draw(st.sampled_from(["torch.ones(1, 1, dtype=torch.bool)", "torch.ones((), dtype=torch.bool)", "x.new_ones((), dtype=torch.bool)", "torch.ones(T, T, dtype=torch.bool)"])),
        "same": draw(keep_mask(True, 0)),
        "wide": f"(torch.arange(T)[None, :] <= torch.arange(T)[:, None] + {draw(st.integers(0, 3))})",
        "window": f"(torch.arange(T)[None, :] > torch.arange(T)[:, None] - {draw(st.integers(1, 40))})",
        "buffer": "CAUSAL[:T, :T]",
        "cmp": draw(comparison(False)) if depth else "torch.ones(1, 1, dtype=torch.bool)",
    }[other]
    op = draw(st.sampled_from(["&", "logical_and", "where", "masked", "bool"] if causal or other in ("same", "ones") else ["&", "|", "^", "logical_and", "where", "masked", "bool"]))
    if op == "&":
        return f"({a} & {b})"
    if op == "|":
        return f"({a} | {b})"
    if op == "^":
        return f"({a} ^ {b})"
    if op == "logical_and":
        return f"torch.logical_and({a}, {b})"
    if op == "where":
        return f"torch.where({a}, {b}, torch.zeros((), dtype=torch.bool))"
    if op == "masked":
        return f"({b} & torch.ones(T, T, dtype=torch.bool).masked_fill(~{a}, False))"
    return f"({a} & {b}).bool()"


DTYPES = ["torch.float64", "torch.float32", "torch.float16", "torch.bfloat16"]
REMOVED = ["float('-inf')", "torch.finfo({dt}).min", "-1e30"]
NEAR_VALUES = ["-1e4", "-10.0", "torch.finfo(torch.float16).min", "-1e29", "0.0", "float('nan')"]


@st.composite
def additive_mask(draw, causal: bool):
    keep = draw(keep_mask(causal))
    dt = draw(st.sampled_from(DTYPES))
    neg = draw(st.sampled_from(REMOVED + ([] if causal else NEAR_VALUES))).format(dt=dt)
    form = draw(st.integers(0, 7))
    if form == 7:  # in place, as transformers 4.3x wrote it (and near misses of that)
        z = "torch.zeros(T, T, dtype=torch.float64)"
        k = 1 if causal else draw(st.integers(0, 2))
        inplace = [
            f"(lambda m: (m.masked_fill_(~{keep}, {neg}), m)[1])({z}).to({dt})",
            f"torch.full((T, T), {neg}, dtype=torch.float64).triu_({k})",
        ]
        if not causal:
            inplace += [
                f"(lambda m: (lambda r: (m.masked_fill_(~{keep}, {neg}), r)[1])(m.clone()))({z})",  # a copy taken before
                f"(lambda m: (lambda r: (m.masked_fill_(~{keep}, {neg}), r + m)[1])(m.clone()))({z})",
                f"(lambda m: (m[:1].fill_({neg}), m)[1])(torch.where({keep}, 0.0, {neg}))",  # through a view
                f"(lambda m: (m.masked_fill_(~{keep}, {neg}), m.fill_(0.0), m)[2])({z})",
            ]
        return draw(st.sampled_from(inplace))
    if form == 0:
        return f"torch.where({keep}, 0.0, {neg})"
    if form == 1:
        return f"torch.where({keep}, torch.zeros((), dtype={dt}), {neg})"
    if form == 2:
        return f"torch.where(~{keep}, {neg}, 0.0).to({dt})"
    if form == 3:
        return f"torch.zeros(T, T, dtype=torch.float64).masked_fill(~{keep}, {neg}).to({dt})"
    if form == 4:  # (1 - keep) * neg: 0 * -inf is nan
        return f"((1.0 - {keep}.to({dt})) * {neg})"
    if form == 5:
        k = 1 if causal else draw(st.integers(0, 2))
        return draw(st.sampled_from([f"torch.triu(torch.full((T, T), {neg}, dtype=torch.float64), diagonal={k})", f"torch.full((T, T), {neg}, dtype=torch.float64).triu({k})"] + ([] if causal else ["NEG_CAUSAL[:T, :T]"])))
    other = draw(keep_mask(True, 0)) if causal else draw(keep_mask(False, 0))
    return f"(torch.where({keep}, 0.0, {neg}) + torch.where({other}, 0.0, {neg}))"


@st.composite
def mask_program(draw):
    causal = draw(st.booleans())
    body = draw(additive_mask(causal)) if draw(st.booleans()) else draw(keep_mask(causal))
    dress = draw(st.sampled_from(["{m}", "{m}", "{m}[None, None]", "{m}.expand(2, 1, T, T)", "{m}.unsqueeze(0)", "{m}.contiguous()"]))
    return dress.format(m=body)


# -- tracing and judging ---------------------------------------------------------------------


def compile_source(exprs: list[str]):
    rets = ", ".join(exprs)
    ns = dict(NAMESPACE)
    exec(f"def masks(x):\n    T = x.shape[1]\n    return ({rets},)\n", ns)
    return ns["masks"]


def trace(exprs: list[str]) -> list:
    """Dynamo graphs' output nodes for ``exprs`` (None where a program cannot be traced)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def run(batch):
        graphs.clear()
        x = torch.zeros(2, 9)
        torch._dynamo.mark_dynamic(x, 1)
        torch.compile(compile_source(batch), backend=backend, fullgraph=True)(x)
        out = next(n for n in graphs[-1].graph.nodes if n.op == "output")
        return list(out.args[0])

    quiet = logging.getLogger("torch._subclasses.fake_tensor")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # invalid programs are expected here
    try:
        return run(exprs)
    except Exception:
        nodes = []
        for e in exprs:  # one of them does not trace: find which
            try:
                nodes.extend(run([e]))
            except Exception:
                nodes.append(None)
        return nodes
    finally:
        quiet.setLevel(level)


def eager_values(expr: str):
    fn = compile_source([expr])
    for t in LENGTHS:
        try:
            m = fn(torch.zeros(2, t))[0]
        except Exception:
            continue  # the program fails at this length: so does its graph (no silent result)
        yield t, m


def judge(expr: str, additive: bool, window: int | None = None) -> str | None:
    """None if the program's eager values are the causal mask (with ``window``: the band
    ``i − window < j ≤ i``) at every length, else why not."""
    for t, m in eager_values(expr):
        if m.dim() < 2:
            return f"T={t}: a {m.dim()}-D mask"
        rows, cols = m.shape[-2], m.shape[-1]
        m = m.expand(*m.shape[:-2], t if rows == 1 else rows, t if cols == 1 else cols)
        i = torch.arange(m.shape[-2])[:, None]
        j = torch.arange(m.shape[-1])[None, :]
        causal = ((j <= i) & (j > i - window if window else True)).expand_as(m)
        if additive:
            ok = bool(((m == 0) == causal).all()) and bool((m[~causal] <= MASKED_THRESHOLD).all())
        else:
            ok = m.dtype == torch.bool and torch.equal(m, causal)
        if not ok:
            return f"T={t}: not the causal mask:\n{m.reshape(-1, m.shape[-2], m.shape[-1])[0]}"
    return None


STATS: Counter = Counter()
REASONS: Counter = Counter()


def check_batch(exprs: list[str]) -> None:
    nodes = trace(exprs)
    for expr, node in zip(exprs, nodes):
        STATS["programs"] += 1
        if not hasattr(node, "op"):
            STATS["not traced"] += 1
            continue
        val = example_value(node)
        if not isinstance(val, torch.Tensor):
            STATS["not traced"] += 1
            continue
        additive = val.dtype != torch.bool
        try:
            window = prove_band(node, additive=additive)
        except NotProvable as why:
            STATS["refused"] += 1
            # "internal:" marks a modelling gap (an op result the prover cannot follow):
            # sound, but a bug to fix.
            assert not str(why).startswith("internal"), f"{why}\n{expr}"
            REASONS[str(why).split(" (")[0][:70]] += 1
            if judge(expr, additive) is None:
                STATS["refused although causal"] += 1  # completeness, not soundness
            continue
        STATS["proven"] += 1
        STATS["windows"] += window is not None
        wrong = judge(expr, additive, window)
        if wrong is not None:
            STATS["wrong"] += 1
            raise AssertionError(f"proven {'a window of ' + str(window) if window else 'causal'} but it is not ({wrong}):\n{expr}")


def report(elapsed: float) -> None:
    line = {k: STATS[k] for k in ("programs", "proven", "windows", "refused", "refused although causal", "not traced", "wrong")}
    line["seconds"] = round(elapsed, 1)
    print(f"\nnear-miss masks: {json.dumps(line)}")
    for reason, count in REASONS.most_common(12):
        print(f"  {count:6d}  {reason}")
    path = os.environ.get("LONGCTX_FUZZ_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"suite": "near_miss_masks", **line}) + "\n")


def test_near_miss_masks_are_never_proven_wrongly():
    STATS.clear()
    REASONS.clear()
    start = time.time()

    @settings(max_examples=max(1, math.ceil(PROGRAMS / BATCH)), deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(st.lists(mask_program(), min_size=BATCH, max_size=BATCH))
    def prop(exprs):
        check_batch(exprs)

    prop()
    report(time.time() - start)
    assert STATS["wrong"] == 0
    # Both outcomes are exercised (a generator that only makes refusals proves nothing).
    assert STATS["proven"] >= STATS["programs"] // 10, dict(STATS)
    assert STATS["refused"] >= STATS["programs"] // 10, dict(STATS)


# -- fixed spellings ---------------------------------------------------------------------------

TRUE_CAUSAL = [
    "torch.arange(T)[None, :] <= torch.arange(T)[:, None]",
    "torch.arange(T).unsqueeze(1) >= torch.arange(T).unsqueeze(0)",
    "~(torch.arange(T)[None] > torch.arange(T)[..., None])",
    "torch.le(torch.arange(3, T + 3).reshape(1, -1), (torch.arange(T) + 3).reshape(-1, 1))",
    "(torch.arange(T) - 2)[None, :].le((torch.arange(T) - 2)[:, None])",
    "torch.arange(T, dtype=torch.float64)[None, :] <= torch.arange(T, dtype=torch.float64)[:, None]",
    "(torch.arange(T)[None, :] <= torch.arange(T)[:, None] + torch.arange(1)).expand(2, 1, T, T)",
    "torch.ones(T, T, dtype=torch.bool).tril()",
    "~torch.ones(T, T, dtype=torch.bool).triu(1)",
    "torch.logical_and(torch.arange(T)[None, :] <= torch.arange(T)[:, None], x.new_ones((), dtype=torch.bool))",
    "(torch.arange(T)[None, :] <= torch.arange(T)[:, None]) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None] + 3)",
    "(torch.arange(T)[:, None] <= torch.arange(T)[None, :]).transpose(0, 1)",
    "torch.where(torch.arange(T)[None, :] <= torch.arange(T)[:, None], 0.0, float('-inf'))",
    "torch.where(torch.arange(T)[None, :] <= torch.arange(T)[:, None], torch.zeros((), dtype=torch.float64), torch.finfo(torch.float64).min)[None, None].expand(2, 1, T, T)",
    "torch.zeros(T, T, dtype=torch.bfloat16).masked_fill(torch.arange(T)[None, :] > torch.arange(T)[:, None], torch.finfo(torch.bfloat16).min)",
    "torch.triu(torch.full((T, T), float('-inf')), diagonal=1)",
    "(1.0 - (torch.arange(T)[None, :] <= torch.arange(T)[:, None]).to(torch.float32)) * torch.finfo(torch.float32).min",
    "torch.where(torch.arange(T)[None, :] <= torch.arange(T)[:, None], 0.0, torch.finfo(torch.float32).min).half()",  # -> -inf in float16
]


def test_true_causal_spellings_are_proven():
    masks = trace(TRUE_CAUSAL)
    for expr, node in zip(TRUE_CAUSAL, masks):
        assert node is not None, expr
        additive = example_value(node).dtype != torch.bool
        assert judge(expr, additive) is None, expr  # the list itself is right
        try:
            prove_causal(node, additive=additive)
        except NotProvable as why:
            pytest.fail(f"not proven: {expr}\n  {why}")


BANDS = [  # (spelling, the window it keeps)
    ("(torch.arange(T)[None, :] > torch.arange(T)[:, None] - 3) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])", 3),
    ("(torch.arange(T)[None, :] >= torch.arange(T)[:, None] - 3) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])", 4),
    ("torch.ones(T, T, dtype=torch.bool).tril().triu(-1)", 2),
    ("torch.where((torch.arange(T)[:, None] - torch.arange(T)[None, :]) < 5, 0.0, float('-inf')) + torch.full((T, T), float('-inf')).triu(1)", 5),
    ("(torch.arange(T)[:, None] - torch.arange(T)[None, :] < 1) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])", 1),
]
NEAR_MISS_BANDS = [
    "(torch.arange(T)[None, :] > torch.arange(T)[:, None] - 3) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None] + 1)",
    "(torch.arange(T)[None, :] > torch.arange(T)[:, None] - 3) & (torch.arange(T)[None, :] < torch.arange(T)[:, None])",
    "((torch.arange(T)[None, :] > torch.arange(T)[:, None] - 3) | (torch.arange(T)[None, :] == 0)) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])",
    "(torch.arange(T)[None, :] > torch.arange(T)[:, None] - T // 2) & (torch.arange(T)[None, :] <= torch.arange(T)[:, None])",
    "torch.where((torch.arange(T)[:, None] - torch.arange(T)[None, :]).abs() < 5, 0.0, float('-inf'))",
]


def test_band_spellings_are_proven_with_their_window_and_near_misses_refused():
    for (expr, w), node in zip(BANDS, trace([e for e, _ in BANDS])):
        additive = example_value(node).dtype != torch.bool
        assert judge(expr, additive, w) is None, expr  # the list itself is right
        assert prove_band(node, additive=additive) == w, expr
    for expr, node in zip(NEAR_MISS_BANDS, trace(NEAR_MISS_BANDS)):
        additive = example_value(node).dtype != torch.bool
        with pytest.raises(NotProvable):
            prove_band(node, additive=additive)


def test_generator_makes_both_kinds():
    # The generator's "causal" templates are causal by the judge (so proofs are exercised).
    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(keep_mask(True))
    def prop(expr):
        assert judge(f"({expr}).expand(T, T)" if "[b, k]" not in expr else expr, additive=False) is None, expr

    prop()
