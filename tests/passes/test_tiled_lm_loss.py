"""The tiled LM-loss pass on small hand-written modules: the spellings it rewrites (plain,
transformers' padded labels, the classic shift slice, ``h @ W.T``, logits also returned),
exactness in float64, one compile for many lengths, and every refusal with its reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import longctx_compiler as lc
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, make_tensor, relative_error

PASS = "tiled_lm_loss"
H, V = 6, 11


def opt(module, chunk=4, **kw):
    kw.setdefault("lm_loss", {"chunk_size": chunk})
    return lc.optimize(module, backend="aot_eager", strict=True, **kw)


def inputs(b, t, seed, *, ignore=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = make_tensor((b, t, H), seed=g, dtype=dtype, low=-2, high=2, requires_grad=True)
    labels = torch.randint(0, V, (b, t), generator=g)
    if ignore:
        labels[torch.rand(b, t, generator=g) < 0.25] = -100
    return h, labels


def pair(cls, *args, **kw):
    """The eager module and an optimized copy with the same parameters."""
    torch.manual_seed(0)
    eager = cls(*args, **kw)
    cand = cls(*args, **kw)
    cand.load_state_dict(eager.state_dict())
    return eager, cand


def first(out):
    return out[0] if isinstance(out, tuple) else out


class PlainLoss(torch.nn.Module):
    """``cross_entropy(lm_head(h).view(-1, V), labels.view(-1))`` in the model's dtype."""

    def __init__(self, bias=False, reduction="mean", dtype=torch.float64):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=bias, dtype=dtype)
        self.reduction = reduction

    def forward(self, h, labels):
        logits = self.lm_head(h)
        return F.cross_entropy(logits.view(-1, V), labels.view(-1), reduction=self.reduction)


class HFStyleLoss(torch.nn.Module):
    """``transformers``' ForCausalLMLoss spelling: upcast, pad+shift the labels, flatten; with
    ``num_items`` the loss is summed and divided. ``cast`` picks the upcast (``"float"`` is
    transformers' own; ``"double"`` keeps a float64 model exact)."""

    def __init__(self, cast="double", num_items=False, return_logits=False, dtype=torch.float64):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
        self.cast, self.num_items, self.return_logits = cast, num_items, return_logits

    def forward(self, h, labels):
        logits = self.lm_head(h)
        x = logits.float() if self.cast == "float" else logits.to(torch.float64)
        labels = F.pad(labels, (0, 1), value=-100)
        shift = labels[..., 1:].contiguous()
        x = x.view(-1, V)
        shift = shift.view(-1)
        if self.num_items:
            n = (shift != -100).sum()
            loss = F.cross_entropy(x, shift, ignore_index=-100, reduction="sum") / n
        else:
            loss = F.cross_entropy(x, shift, ignore_index=-100, reduction="mean")
        return (loss, logits) if self.return_logits else loss


class ShiftSliceLoss(torch.nn.Module):
    """The classic shift spelling: slice the logits, ``.contiguous()``, ``view(-1, V)``."""

    def __init__(self, bias=True, transposed_matmul=False, return_logits=False):
        super().__init__()
        self.weight = torch.nn.Parameter(make_tensor((V, H), seed=1))
        self.bias = torch.nn.Parameter(make_tensor((V,), seed=2)) if bias else None
        self.transposed_matmul, self.return_logits = transposed_matmul, return_logits

    def forward(self, h, labels):
        logits = h @ self.weight.T if self.transposed_matmul else F.linear(h, self.weight, self.bias)
        shift_logits = logits[..., :-1, :].contiguous()
        shift_labels = labels[..., 1:].contiguous()
        loss = F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1))
        return (loss, logits) if self.return_logits else loss


def loss_and_logits(out):
    # Both outputs carry gradient: the loss and a fixed non-uniform weighting of the logits.
    loss, logits = out
    w = torch.linspace(0.5, 1.5, logits.numel(), dtype=logits.dtype).reshape(logits.shape)
    return loss + (logits * w).sum()


def graph_targets(om):
    return [n.target for n in om.report.graphs[0].after.nodes]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_plain_linear_cross_entropy_exact_and_one_compile(bias, reduction):
    eager, cand = pair(PlainLoss, bias, reduction)
    om = opt(cand, chunk=5)

    @settings(max_examples=6, deadline=None)
    @given(t=st.integers(2, 23), seed=st.integers(0, 2**16), ignore=st.booleans())
    def prop(t, seed, ignore):
        h, labels = inputs(2, t, seed, ignore=ignore)
        report = assert_gradients_match(eager, om, [h, labels], loss_fn=first)
        assert report.errors["loss"][0] <= EXACT_RTOL
        assert om.report.count(PASS) == 1

    prop()
    # lengths below, above and not a multiple of the tile share one graph
    assert om.compile_count == 1
    rw = om.report.rewrites[0]
    assert rw.kind == "linear+cross_entropy -> linear_cross_entropy"
    assert rw.details["chunk_size"] == 5 and rw.details["reduction"] == reduction and rw.details["bias"] == bias
    assert rw.details["logits_kept"] is False
    # the head is gone: no [N, V] logits are ever computed
    targets = graph_targets(om)
    assert "torch.nn.linear" not in targets and "longctx.linear_cross_entropy_fwd.default" in targets
    assert rw.site.startswith("lm_head")


@pytest.mark.parametrize("num_items", [False, True])
def test_transformers_padded_labels_spelling_exact(num_items):
    eager, cand = pair(HFStyleLoss, "double", num_items)
    om = opt(cand)
    for t, seed in ((9, 0), (4, 1), (17, 2)):
        h, labels = inputs(2, t, seed)
        report = assert_gradients_match(eager, om, [h, labels], loss_fn=first)
        assert report.errors["loss"][0] <= EXACT_RTOL
    assert om.compile_count == 1 and om.report.count(PASS) == 1
    assert om.report.rewrites[0].details["reduction"] == ("sum" if num_items else "mean")
    if num_items:
        # the division by num_items_in_batch stays in the graph
        assert "operator.truediv" in graph_targets(om)


def test_float32_upcast_of_a_float64_model_keeps_float64_gradients():
    # transformers' `.float()` rounds a float64 model's logits down to float32. The op stays in
    # float64 (at least the original precision): gradients equal a float64 loss exactly, the
    # loss keeps the original float32 dtype, and both are within float32 round-off of eager.
    eager, cand = pair(HFStyleLoss, "float")
    exact_ref = HFStyleLoss("double")
    exact_ref.load_state_dict(eager.state_dict())
    om = opt(cand)
    h, labels = inputs(2, 13, 5)
    out = om(h, labels)
    assert out.dtype == torch.float32
    params = [cand.lm_head.weight, h]
    got = torch.autograd.grad(out, params)
    want = torch.autograd.grad(exact_ref(h, labels), [exact_ref.lm_head.weight, h])
    for g, w in zip(got, want):
        assert g.dtype == torch.float64 and relative_error(g, w) <= EXACT_RTOL
    assert relative_error(out, exact_ref(h, labels)) <= torch.finfo(torch.float32).eps
    assert_gradients_match(eager, om, [h, labels], loss_fn=first, rtol=1e-5)
    assert om.report.count(PASS) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_models_follow_the_dtype_rule(dtype):
    # transformers' own spelling in a 16/32-bit model: logits in the model dtype, `.float()`,
    # loss in float32. Error against float64 at most 2x plain PyTorch's in the same dtype.
    torch.manual_seed(0)
    reference = HFStyleLoss("double", return_logits=True)
    baseline = HFStyleLoss("float", return_logits=True, dtype=dtype)
    cand = HFStyleLoss("float", return_logits=True, dtype=dtype)
    baseline.load_state_dict(reference.state_dict())
    cand.load_state_dict(reference.state_dict())
    om = opt(cand, chunk=8)
    h, labels = inputs(2, 29, 7, dtype=dtype)
    assert_gradients_match(reference, om, [h, labels], loss_fn=first, baseline=baseline)
    assert om.report.count(PASS) == 1


@pytest.mark.parametrize("transposed_matmul, bias", [(False, False), (False, True), (True, False)], ids=["linear", "linear+bias", "h@W.T"])
def test_shift_slice_spelling_exact(transposed_matmul, bias):
    eager, cand = pair(ShiftSliceLoss, bias, transposed_matmul)
    om = opt(cand, chunk=3)
    for t, seed in ((7, 0), (3, 1), (12, 2)):
        h, labels = inputs(2, t, seed)
        assert_gradients_match(eager, om, [h, labels], loss_fn=first)
    assert om.compile_count == 1 and om.report.count(PASS) == 1
    rw = om.report.rewrites[0]
    assert rw.details["shift_slice"] and rw.kind.startswith("matmul" if transposed_matmul else "linear")


@pytest.mark.parametrize("module", ["hf", "shift"])
def test_logits_also_returned_are_kept_and_not_recomputed_in_forward(module):
    eager, cand = pair(HFStyleLoss, "double", False, True) if module == "hf" else pair(ShiftSliceLoss, True, False, True)
    om = opt(cand, chunk=4, lm_loss={"chunk_size": 4, "return_logits": True})
    for t, seed in ((10, 0), (5, 1), (19, 2)):
        h, labels = inputs(2, t, seed)
        report = assert_gradients_match(eager, om, [h, labels], loss_fn=loss_and_logits)
        # and the loss alone (its gradient flows only through the op's recomputed tiles)
        assert_gradients_match(eager, om, [h, labels], loss_fn=first)
        assert report.errors["loss"][0] <= EXACT_RTOL
    assert om.compile_count == 1 and om.report.count(PASS) == 1
    rw = om.report.rewrites[0]
    assert rw.details["logits_kept"] and rw.kind.endswith("(logits kept)")
    # one head matmul in the graph (for the returned logits), none added by the rewrite
    targets = graph_targets(om)
    assert targets.count("torch.nn.linear") == 1 and any(str(t).endswith(".detach") for t in targets)


@pytest.mark.parametrize("module", ["hf", "shift"])
def test_returned_logits_are_none_in_training_and_kept_without_gradient(module):
    eager, cand = pair(HFStyleLoss, "double", False, True) if module == "hf" else pair(ShiftSliceLoss, True, False, True)
    om = opt(cand, chunk=4)
    for t, seed in ((10, 0), (5, 1), (19, 2)):
        h, labels = inputs(2, t, seed)
        assert_gradients_match(eager, om, [h, labels], loss_fn=first)
        assert om(h, labels)[1] is None
    assert om.compile_count == 1 and om.report.count(PASS) == 1
    rw = om.report.rewrites[0]
    assert not rw.details["logits_kept"] and "None" in rw.details["logits"]
    # the head's [.., V] matmul is gone: the op computes its tiles' logits itself
    assert "torch.nn.linear" not in [str(t) for t in graph_targets(om)]
    # without a gradient (evaluation, generate) the logits come back, equal to eager's
    h, labels = inputs(2, 7, 3)
    with torch.no_grad():
        want, got = eager(h, labels), om(h, labels)
    assert got[1] is not None
    torch.testing.assert_close(got, want, rtol=EXACT_RTOL, atol=0)


def test_loss_through_nn_cross_entropy_module():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lm_head = torch.nn.Linear(H, V, dtype=torch.float64)
            self.loss = torch.nn.CrossEntropyLoss(ignore_index=3, reduction="sum")

        def forward(self, h, labels):
            return self.loss(self.lm_head(h).flatten(0, 1), labels.flatten())

    eager, cand = pair(M)
    om = opt(cand)
    h, labels = inputs(3, 8, 0, ignore=False)
    labels[0, :3] = 3
    assert_gradients_match(eager, om, [h, labels], loss_fn=first)
    assert om.report.count(PASS) == 1 and om.report.rewrites[0].details["ignore_index"] == 3


def test_matmul_with_a_vocab_last_projection():
    # h @ P with P [H, V] (no transpose to strip): the op gets W = P.t(), a view.
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Parameter(make_tensor((H, V), seed=3))

        def forward(self, h, labels):
            return F.cross_entropy((h @ self.proj).reshape(-1, V), labels.reshape(-1), reduction="sum")

    eager, cand = pair(M)
    om = opt(cand, chunk=7)
    for t, seed in ((5, 0), (16, 1)):
        h, labels = inputs(2, t, seed)
        assert_gradients_match(eager, om, [h, labels], loss_fn=first)
    assert om.compile_count == 1 and om.report.count(PASS) == 1
    assert om.report.rewrites[0].kind == "matmul+cross_entropy -> linear_cross_entropy"


def _inplace(logits, labels):
    logits[..., 0] = -1.0
    return F.cross_entropy(logits.view(-1, V), labels.view(-1))


def _inplace_method(logits, labels):
    logits.mul_(2.0)
    return F.cross_entropy(logits.view(-1, V), labels.view(-1))


def _vocab_slice(logits, labels):
    return F.cross_entropy(logits[..., : V - 1].reshape(-1, V - 1), labels.view(-1).clamp(max=V - 2))


REFUSALS = {
    "label_smoothing": (lambda x, y: F.cross_entropy(x.view(-1, V), y.view(-1), label_smoothing=0.1), "label_smoothing"),
    "class weights": (lambda x, y: F.cross_entropy(x.view(-1, V), y.view(-1), weight=torch.linspace(0.5, 2, V, dtype=x.dtype)), "class weights"),
    "reduction none": (lambda x, y: F.cross_entropy(x.view(-1, V), y.view(-1), reduction="none").sum(), "reduction='none'"),
    "soft targets": (lambda x, y: F.cross_entropy(x.view(-1, V), F.one_hot(y.view(-1).clamp(min=0), V).to(x.dtype)), "soft"),
    "in-place setitem": (_inplace, "modified in place by `setitem`"),
    "in-place method": (_inplace_method, "modified in place by `mul_`"),
    "vocabulary slice": (_vocab_slice, "selects vocabulary entries"),
    "class dim": (lambda x, y: F.cross_entropy(x.transpose(1, 2), y), "between the LM head"),
}


class LossOnHead(torch.nn.Module):
    def __init__(self, loss):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
        self.loss = loss

    def forward(self, h, labels):
        return self.loss(self.lm_head(h), labels)


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_leave_the_loss_alone_with_the_reason(case):
    loss, reason = REFUSALS[case]
    eager, cand = pair(LossOnHead, loss)
    om = opt(cand)
    h, labels = inputs(2, 9, 3, ignore=case not in ("soft targets", "vocabulary slice"))
    assert_gradients_match(eager, om, [h, labels], loss_fn=first)
    assert om.report.count(PASS) == 0
    refusals = [r for r in om.report.refusals if r.pass_name == PASS]
    assert len(refusals) == 1 and reason in refusals[0].reason, [r.reason for r in om.report.refusals]


@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("module", ["plain", "hf"])
def test_autocast_head_is_rewritten_within_the_dtype_rule(where, module):
    # Under torch.autocast (HF Trainer's bf16=True) the head runs in bfloat16 on float32
    # operands and the loss in float32 (cross_entropy is on autocast's float32 list). The op
    # takes the same dtypes (explicit casts of h, W, b to bfloat16; float32 accumulation): loss
    # and every gradient within 2x plain PyTorch's autocast error against float64. Autocast
    # entered inside the compiled function (enter/exit nodes in the graph) or around it.
    torch.manual_seed(0)
    make = (lambda dt: PlainLoss(True, "mean", dt)) if module == "plain" else (lambda dt: HFStyleLoss("float", return_logits=True, dtype=dt))
    reference, baseline, cand = make(torch.float64), make(torch.float32), make(torch.float32)
    baseline.load_state_dict(reference.state_dict())
    cand.load_state_dict(reference.state_dict())

    def autocast(m):
        def f(h, labels):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return m(h, labels)
        return f

    if where == "inside":
        om = lc.optimize(autocast(cand), backend="aot_eager", strict=True, lm_loss={"chunk_size": 4})
        compiled = om
    else:
        om = opt(cand, chunk=4)
        compiled = autocast(om)

    def run(m, h, y):  # the candidate's parameters are cand's; it runs compiled (float64 is never autocast)
        return compiled(h, y) if m is cand else autocast(m)(h, y)

    h, labels = inputs(2, 21, 4, dtype=torch.float32)
    assert_gradients_match(reference, cand, [h, labels], loss_fn=first, baseline=baseline, call=run)
    assert om.report.count(PASS) == 1
    rw = om.report.rewrites[0]
    assert "bfloat16" in rw.details["autocast"] and "precision" not in rw.details
    assert not [r for r in om.report.refusals if r.pass_name == PASS]


PRECISION_CASES = {
    # name: (model dtype, cast between head and loss, expected note)
    "float64 .float()": (torch.float64, "float", "computes in float64 where the original rounded the logits to float32 (`.float()`"),
    "float64 .half()": (torch.float64, "half", "computes in float64 where the original rounded the logits to float16 (`.half()`"),
    "float64 .bfloat16()": (torch.float64, "bfloat16", "computes in float64 where the original rounded the logits to bfloat16 (`.bfloat16()`"),
    "float32 .half()": (torch.float32, "half", "computes in float32 where the original rounded the logits to float16"),
    "bfloat16, no upcast": (torch.bfloat16, None, "computes in float32 where the original computed cross_entropy in bfloat16"),
}


class CastHead(torch.nn.Module):
    def __init__(self, dtype, cast):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=False, dtype=dtype)
        self.cast = cast

    def forward(self, h, labels):
        logits = self.lm_head(h)
        if self.cast is not None:
            logits = getattr(logits, self.cast)()
        return F.cross_entropy(logits.view(-1, V), labels.view(-1))


@pytest.mark.parametrize("case", sorted(PRECISION_CASES))
def test_a_lossy_cast_the_op_does_not_reproduce_is_in_the_report(case):
    # Between the head and the loss the original rounds the logits (or computes the loss in 16
    # bits); the op computes in its accumulation dtype instead — more precise, by design, and
    # said per site: details["precision"] and the report's table. The value is the exact
    # loss in that dtype, returned in the original's dtype.
    dtype, cast, note = PRECISION_CASES[case]
    eager, cand = pair(CastHead, dtype, cast)
    exact = CastHead(torch.float64, None)
    exact.load_state_dict({k: v.double() for k, v in eager.state_dict().items()})
    om = opt(cand)
    h, labels = inputs(2, 11, 2, dtype=dtype)
    out = om(h, labels)
    assert out.dtype == eager(h, labels).dtype
    assert om.report.count(PASS) == 1
    rw = om.report.rewrites[0]
    assert rw.details["precision"].startswith(note), rw.details["precision"]
    assert note in str(om.report)
    if dtype == torch.float64:
        # exactly the float64 loss without the cast, rounded once to the original's dtype
        g = torch.autograd.grad(out, [cand.lm_head.weight])[0]
        want = exact(h.detach(), labels)
        assert relative_error(out, want) <= 2 * torch.finfo(out.dtype).eps
        g_want = torch.autograd.grad(want, [exact.lm_head.weight])[0]
        assert relative_error(g, g_want) <= (EXACT_RTOL if out.dtype == torch.float32 or cast is None else 2 * torch.finfo(out.dtype).eps)


def test_a_cast_up_beyond_the_op_accumulation_is_refused():
    # float32 logits cast up to float64 before the loss: the original's log-softmax is float64,
    # the op would accumulate in float32 (less precise): refused with the reason.
    eager, cand = pair(CastHead, torch.float32, "double")
    om = opt(cand)
    h, labels = inputs(2, 7, 1, dtype=torch.float32)
    torch.testing.assert_close(om(h, labels), eager(h, labels))
    assert om.report.count(PASS) == 0
    (refusal,) = [r for r in om.report.refusals if r.pass_name == PASS]
    assert "cast up to float64" in refusal.reason and "less precise" in refusal.reason


def test_other_losses_are_not_matched():
    def f(x, labels):
        return F.cross_entropy(torch.sin(x).view(-1, V), labels.view(-1))

    om = lc.optimize(f, backend="aot_eager", strict=True)
    x = make_tensor((2, 5, V), seed=0, requires_grad=True)
    om(x, torch.randint(0, V, (2, 5)))
    assert om.report.count(PASS) == 0 and not om.report.refusals


def test_disabled_config_and_chunk_size():
    eager, cand = pair(PlainLoss)
    om = lc.optimize(cand, backend="aot_eager", lm_loss={"enabled": False})
    h, labels = inputs(2, 7, 0)
    om(h, labels)
    assert om.report.count() == 0 and not om.report.refusals
    om = lc.optimize(eager, backend="aot_eager", lm_loss={"chunk_size": 3})
    om(h, labels)
    assert om.report.rewrites[0].details["chunk_size"] == 3


class TransformedHead(torch.nn.Module):
    """``cross_entropy(transform(lm_head(h)).view(-1, V), labels)`` with ``transform`` given."""

    def __init__(self, transform):
        super().__init__()
        self.lm_head = torch.nn.Linear(H, V, bias=False, dtype=torch.float64)
        self.transform = transform

    def forward(self, h, labels):
        return F.cross_entropy(self.transform(self.lm_head(h)).view(-1, V), labels.view(-1))


_FOLDED = {
    "scale": (lambda x: x * 0.5, 0.5, 0.0),
    "scale first": (lambda x: 2.0 * x, 2.0, 0.0),
    "division": (lambda x: x / 4.0, 0.25, 0.0),
    "softcap": (lambda x: torch.tanh(x / 3.0) * 3.0, 1.0, 3.0),
    "scale then softcap": (lambda x: torch.tanh((x * 2.0) / 5.0) * 5.0, 2.0, 5.0),
    "bare tanh": (lambda x: torch.tanh(x), 1.0, 1.0),
    "tanh of a scaled logit": (lambda x: torch.tanh(x / 2.0), 0.5, 1.0),
}


@pytest.mark.parametrize("name", sorted(_FOLDED))
def test_scales_and_softcapping_are_folded_into_the_op_exactly(name):
    transform, scale, cap = _FOLDED[name]
    eager, cand = pair(TransformedHead, transform)
    om = opt(cand)
    for t, seed in ((9, 0), (4, 1)):
        assert_gradients_match(eager, om, list(inputs(2, t, seed)), loss_fn=first)
    (rw,) = om.report.rewrites
    assert rw.details.get("logit_scale", 1.0) == scale and rw.details.get("softcap", 0.0) == cap


_NOT_FOLDED = {
    "scale after softcap": (lambda x: torch.tanh(x / 3.0) * 3.0 * 2.0, "after the tanh"),
    "cap without its division": (lambda x: torch.tanh(x) * 3.0, "without the matching"),
    "two tanh": (lambda x: torch.tanh(torch.tanh(x)), "tanh applied 2 times"),
    "negative cap": (lambda x: torch.tanh(x / -2.0) * -2.0, "positive cap"),
}


@pytest.mark.parametrize("name", sorted(_NOT_FOLDED))
def test_transforms_the_op_cannot_take_are_refused_and_exact(name):
    transform, reason = _NOT_FOLDED[name]
    eager, cand = pair(TransformedHead, transform)
    om = lc.optimize(cand, backend="aot_eager", lm_loss={"chunk_size": 4})
    with pytest.warns(lc.RefusalWarning):
        assert_gradients_match(eager, om, list(inputs(2, 7, 0)), loss_fn=first)
    (refusal,) = om.report.refusals
    assert reason in refusal.reason and om.report.count(PASS) == 0
