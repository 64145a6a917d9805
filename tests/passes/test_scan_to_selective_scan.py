"""Raising ``scan`` higher-order ops with a linear selective-scan body to the canonical op:
exactness in float64 at many T with one compile, refusals with reasons, graph size
independent of T."""

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._higher_order_ops.scan import scan

import longctx_compiler as lc
from longctx_compiler.passes.scan_to_selective_scan import _associative_reason
from longctx_compiler.testing import EXACT_RTOL, make_tensor, relative_error

B_, D_, N_ = 2, 3, 4


def params(seed=0):
    A = -make_tensor((D_, N_), seed=seed, low=0.1, high=1.0)
    Dp = make_tensor((D_,), seed=seed + 1)
    return A.requires_grad_(), Dp.requires_grad_()


def inputs(t, seed, time_dim=1):
    def seq(width, s, low=-1.0, high=1.0):
        shape = [B_, width]
        shape.insert(time_dim, t)
        return make_tensor(shape, seed=seed + s, low=low, high=high).requires_grad_()

    return [seq(D_, 0, 0.05, 0.5), seq(N_, 1), seq(D_, 2), seq(N_, 3), make_tensor((B_, D_, N_), seed=seed + 4).requires_grad_()]


def selective_scan_fn(A, Dp, form="sum"):
    def body(h, x):
        dt, Bt, ut, Ct = x
        a = torch.exp(dt[..., None] * A)
        h = a * h + (dt * ut)[..., None] * Bt[:, None, :]
        if form == "sum":
            y = (h * Ct[:, None, :]).sum(-1) + Dp * ut
        else:  # transformers' spelling of the readout, with unsqueeze views
            y = torch.matmul(h, Ct.unsqueeze(-1)).squeeze(-1)
        return h, y

    def f(dt, Bm, u, Cm, h0):
        return scan(body, h0, (dt, Bm, u, Cm), dim=1)

    return f


def grads_of(fn, ins, extra, weights):
    outs = fn(*ins)
    loss = sum((o * w).sum() for o, w in zip(outs, weights))
    return [o.detach() for o in outs] + list(torch.autograd.grad(loss, ins + extra))


def optimized(fn, **ssm):
    return lc.optimize(fn, backend="aot_eager", strict=True, ssm={"chunk_size": 5, **ssm})


@pytest.mark.parametrize("form", ["sum", "matmul"])
def test_linear_body_is_raised_and_exact_at_many_lengths_with_one_compile(form):
    A, Dp = params()
    f = selective_scan_fn(A, Dp, form)
    opt = optimized(f)
    extra = [A, Dp] if form == "sum" else [A]

    # T below and above the chunk size (5) share one graph.
    @settings(max_examples=6, deadline=None)
    @given(t=st.integers(2, 40), seed=st.integers(0, 2**16))
    def prop(t, seed):
        ins = inputs(t, seed)
        weights = [make_tensor((B_, D_, N_), seed=seed + 9), make_tensor((B_, t, D_), seed=seed + 10)]
        ref = grads_of(f, ins, extra, weights)
        got = grads_of(opt, ins, extra, weights)
        for name, r, g in zip(["final", "ys", "dt", "B", "u", "C", "h0", "A", "D"], ref, got):
            assert relative_error(g, r, scale=1e-12) <= EXACT_RTOL, name
        assert opt.report.count("scan_to_selective_scan", "scan -> selective_scan") == 1
        assert opt.report.count("adjoint_sharded_scan", "scan -> selective_scan(adjoint-sharded)") == 1

    prop()
    assert opt.compile_count == 1
    after = opt.report.graphs[0].after
    assert not any(n.target == "higher_order.scan" for n in after.nodes)
    details = opt.report.rewrites[1].details
    assert details["chunk_size"] == 5 and details["mode"] == "exact"


def test_scan_along_dim0_and_final_state_only():
    A, _ = params(3)

    # No per-step output: only the final state is used.
    def f(dt, Bm, u, h0):
        def step(h, x):
            dt, Bt, ut = x
            return torch.exp(dt.unsqueeze(-1) * A) * h + dt.unsqueeze(-1) * ut.unsqueeze(-1) * Bt.unsqueeze(1), []

        final, _ = scan(step, h0, (dt, Bm, u), dim=0)
        return final

    opt = optimized(f, chunk_size=3)
    for t in (5, 11):
        ins = [make_tensor((t, B_, D_), seed=t, low=0.05, high=0.5), make_tensor((t, B_, N_), seed=t + 1), make_tensor((t, B_, D_), seed=t + 2), make_tensor((B_, D_, N_), seed=t + 3)]
        ins = [x.requires_grad_() for x in ins]
        torch._dynamo.maybe_mark_dynamic(ins[0], 0)
        ref = f(*ins)
        got = opt(*ins)
        assert relative_error(got, ref) <= EXACT_RTOL
        gr = torch.autograd.grad(ref.sum(), ins + [A])
        gg = torch.autograd.grad(got.sum(), ins + [A])
        assert max(relative_error(a, b, scale=1e-12) for a, b in zip(gg, gr)) <= EXACT_RTOL
    assert opt.report.count("scan_to_selective_scan") == 1


def _refusal_case(name):
    A, Dp = params(5)

    def standard(h, dt, ut, Bt):
        return torch.exp(dt[..., None] * A) * h, (dt * ut)[..., None] * Bt[:, None, :]

    def body(h, x):
        dt, Bt, ut, Ct = x
        ah, b = standard(h, dt, ut, Bt)
        if name == "tanh":
            h2 = torch.tanh(ah + b)
        elif name == "gate":
            h2 = ah * torch.sigmoid(h) + b
        elif name == "quadratic":
            h2 = ah * h + b
        elif name == "constant_decay":
            h2 = 0.9 * h + b
        elif name == "precomputed_decay":
            h2 = Ct[:, None, :] * h + b
        elif name == "no_delta_in_b":
            h2 = ah + ut[..., None] * Bt[:, None, :]
        elif name == "old_state_readout":
            h2 = ah + b
            return h2, (h * Ct[:, None, :]).sum(-1)
        elif name == "returns_states":
            h2 = ah + b
            return h2, h2.clone()
        elif name == "time_varying_A":
            h2 = torch.exp(dt[..., None] * Ct[:, None, :]) * h + b
        else:
            raise AssertionError(name)
        return h2, (h2 * Ct[:, None, :]).sum(-1)

    def f(dt, Bm, u, Cm, h0):
        return scan(body, h0, (dt, Bm, u, Cm), dim=1)

    return f


@pytest.mark.parametrize(
    "name, reason",
    [
        ("tanh", "body is not linear in the carry: tanh"),
        ("gate", "body is not linear in the carry: sigmoid"),
        ("quadratic", "quadratic in the state"),
        ("constant_decay", "the constant 0.9, not exp(Δ·A)"),
        ("precomputed_decay", "scanned input #3, not exp(Δ·A)"),
        ("no_delta_in_b", "not Δ·B·u"),
        ("old_state_readout", "reads the state before the update"),
        ("returns_states", "per-step state itself"),
        ("time_varying_A", "A varies with time"),
    ],
)
def test_refused_bodies_are_left_as_is_with_reasons(name, reason):
    f = _refusal_case(name)
    opt = optimized(f)
    ins = inputs(6, 0)
    with torch.no_grad():
        ref = f(*ins)
        got = opt(*ins)
    for r, g in zip(ref, got):
        assert relative_error(g, r) <= EXACT_RTOL
    report = opt.report
    assert report.count("scan_to_selective_scan") == 0
    assert len(report.refusals) == 1 and reason in report.refusals[0].reason, report.refusals
    assert any(n.target == "higher_order.scan" for n in report.graphs[0].after.nodes)


def test_graph_size_does_not_grow_with_T():
    A, Dp = params()
    f = selective_scan_fn(A, Dp)
    sizes = []
    for t in (4, 64):
        torch._dynamo.reset()
        report = lc.explain(f, *inputs(t, 1), config=lc.Config(sequence_dim=None, ssm={"chunk_size": 8}))
        assert report.count("scan_to_selective_scan") == 1
        sizes.append(len(report.graphs[0].after.nodes))
    assert sizes[0] == sizes[1]


def test_associative_scan_combine_is_analysed_and_refused():
    # On CPU associative_scan has no single node (it is unrolled); its pointwise HOP (CUDA)
    # carries the combine body. The combine of a linear recurrence is recognised as such and
    # the reason names what is missing; a non-linear combine is named too.
    affine = fx.symbolic_trace(lambda al, bl, ar, br: (al * ar, ar * bl + br))
    assert "is the affine composition" in _associative_reason(affine)
    nonlinear = fx.symbolic_trace(lambda al, bl, ar, br: (al * ar, torch.tanh(ar * bl + br)))
    assert "not linear" in _associative_reason(nonlinear)


def _readout_body(A, Dp, readout):
    """A selective-scan body whose readout is spelled ``readout`` (a lossy cast, a wider
    sum, ...); everything else is the accepted recurrence."""

    def body(h, x):
        dt, Bt, ut, Ct = x
        h = torch.exp(dt[..., None] * A) * h + (dt * ut)[..., None] * Bt[:, None, :]
        prod = h * Ct[:, None, :]
        if readout == "sum_dtype_float32":
            y = prod.sum(-1, dtype=torch.float32)
        elif readout == "float":
            y = prod.sum(-1).float()
        elif readout == "sum_dtype_float64":
            y = prod.sum(-1, dtype=torch.float64)
        elif readout == "double_state":
            y = (h.double() * Ct[:, None, :]).sum(-1)
        else:
            y = prod.sum(-1)
        return h, y + (Dp * ut).to(y.dtype)

    def f(dt, Bm, u, Cm, h0):
        return scan(body, h0, (dt, Bm, u, Cm), dim=1)

    return f


@pytest.mark.parametrize("readout, op", [("sum_dtype_float32", "sum"), ("float", "float")])
def test_a_readout_rounded_down_is_computed_in_float64_and_reported(readout, op):
    # Issue 14: a float64 body whose readout is summed with dtype=float32 (or cast down) is
    # computed in float64 by the op. Its outputs keep the original's dtypes (float32 ys), the
    # values are the float64 ones rounded once, and the report says so per site.
    A, Dp = params()
    f, exact = _readout_body(A, Dp, readout), _readout_body(A, Dp, "plain")
    opt = optimized(f)
    ins = inputs(11, 3)
    final, ys = opt(*ins)
    ref_final, ref_ys = f(*ins)
    assert ys.dtype == ref_ys.dtype == torch.float32 and final.dtype == torch.float64
    ex_final, ex_ys = exact(*ins)
    assert relative_error(ys, ex_ys.float()) <= EXACT_RTOL and relative_error(final, ex_final) <= EXACT_RTOL
    assert relative_error(ys, ref_ys) <= 1e-6  # the original, float32-rounded readout
    w = make_tensor(ys.shape, seed=5)
    got = torch.autograd.grad((ys.double() * w).sum(), ins + [A, Dp])
    want = torch.autograd.grad((ex_ys * w.float().double()).sum(), ins + [A, Dp])
    for g, r in zip(got, want):
        assert relative_error(g, r, scale=1e-12) <= EXACT_RTOL
    report = opt.report
    note = f"computes in float64 where the original body computed `{op}` in float32"
    assert report.count("scan_to_selective_scan") == 1 and report.count("adjoint_sharded_scan") == 1
    assert all(note in r.details["precision"] for r in report.rewrites if r.pass_name.endswith("scan")), report.rewrites
    assert note in str(report)


@pytest.mark.parametrize("readout", ["sum_dtype_float64", "double_state"])
def test_a_readout_wider_than_the_scan_is_refused(readout):
    # A float32 body that sums its readout in float64: the op (float32) would be less precise.
    A, Dp = (t.detach().float().requires_grad_() for t in params())
    f = _readout_body(A, Dp, readout)
    opt = optimized(f)
    ins = [x.detach().float().requires_grad_() for x in inputs(7, 1)]
    with torch.no_grad():
        for r, g in zip(f(*ins), opt(*ins)):
            assert r.dtype == g.dtype and relative_error(g, r) <= 1e-12
    assert opt.report.count("scan_to_selective_scan") == 0
    (refusal,) = opt.report.refusals
    assert "wider than the scan's float32" in refusal.reason and "less precise" in refusal.reason


def test_autocast_matmul_readout_and_bfloat16_activations_are_raised_within_the_dtype_rule():
    # Under torch.autocast the readout matmul runs in bfloat16 and an input projection gives a
    # bfloat16 u next to float32 Δ, B, C: the op widens the activations (exact), computes in
    # float32, returns y in the original's bfloat16 and says where it is more precise; its error
    # against float64 is within 2x plain PyTorch's autocast error, outputs and every gradient.
    def make(dtype):
        A, _ = params()
        A = A.detach().to(dtype).requires_grad_()
        W = make_tensor((D_, D_), seed=11, dtype=dtype).requires_grad_()
        body_fn = selective_scan_fn(A, None, "matmul")

        def f(dt, Bm, u, Cm, h0):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return body_fn(dt, Bm, u @ W, Cm, h0)

        return f, [A, W]

    f64, p64 = make(torch.float64)
    f32, p32 = make(torch.float32)
    opt = optimized(f32)
    ins64 = inputs(13, 4)
    ins32 = [x.detach().float().requires_grad_() for x in ins64]
    weights = [make_tensor((B_, D_, N_), seed=9), make_tensor((B_, 13, D_), seed=10)]

    def run(fn, ins, params):
        outs = fn(*ins)
        loss = sum((o.double() * w).sum() for o, w in zip(outs, weights))
        return [o.detach() for o in outs] + list(torch.autograd.grad(loss, ins + params))

    ref, base, got = run(f64, ins64, p64), run(f32, ins32, p32), run(opt, ins32, p32)
    assert [t.dtype for t in got[:2]] == [t.dtype for t in base[:2]] == [torch.float32, torch.bfloat16]
    for name, r, b, g in zip(["final", "ys", "dt", "B", "u", "C", "h0", "A", "W"], ref, base, got):
        assert relative_error(g, r) <= 2 * relative_error(b, r) + 4 * torch.finfo(torch.float32).eps, name
    report = opt.report
    assert report.count("scan_to_selective_scan") == 1 and report.count("adjoint_sharded_scan") == 1
    rw = next(r for r in report.rewrites if r.pass_name == "scan_to_selective_scan")
    assert rw.details["compute_dtype"] == "float32"
    assert "`matmul` in bfloat16" in rw.details["precision"]
