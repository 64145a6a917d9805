"""Triton kernels of the SSD scan, run on CPU under TRITON_INTERPRET=1.

The interpreter must be chosen before triton is first imported, and other tests in the same
pytest process import triton normally; so the check runs in a fresh Python subprocess with
``TRITON_INTERPRET=1`` in its environment (tiny shapes) and reports back through its exit
status and output.

Tolerances: in float32 the kernels' error against the float64 reference must be at most twice
the float32 reference's own error (the project's dtype rule, no hand-tuned constant); in
float64 they must match the reference to 1e-10.
"""

import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os
    assert os.environ.get("TRITON_INTERPRET") == "1"
    import torch
    from longctx_compiler.kernels.ssd import ssd_reference
    from longctx_compiler.kernels.ssd import triton as ssd_triton
    from longctx_compiler.kernels.ssd.triton import ssd_triton_bwd, ssd_triton_fwd
    from longctx_compiler.testing import assert_exact, assert_within_dtype_rule, make_tensor

    NAMES = ["x", "dt", "A", "B", "C", "D", "z", "dt_bias", "initial_states"]
    CASES = [  # batch, T, heads, headdim, groups, dstate, chunk, D, optionals, document starts, dt_limit
        (2, 7, 4, 3, 2, 3, 3, "head", True, None, None),          # T not a multiple of the chunk, G > 1
        (1, 1, 2, 2, 1, 2, 4, None, True, None, None),            # T = 1
        (1, 5, 2, 2, 1, 5, 8, "channel", False, None, (0.2, 0.6)),  # T < chunk, dt clamp
        (2, 8, 2, 2, 1, 3, 4, "head", True, [4], None),           # a reset exactly at a chunk boundary
        (1, 10, 4, 2, 4, 2, 5, "channel", True, [2, 3, 5, 9], None),  # resets inside chunks, G = H
        (1, 12, 2, 3, 2, 4, 2, None, False, [6], (0.0, 1.0)),     # M = 6 chunks
    ]

    def inputs(seed, b, T, H, P, G, N, D, opts, dtype):
        gen = torch.Generator().manual_seed(seed)
        a = dict(
            x=make_tensor((b, T, H, P), seed=gen), dt=make_tensor((b, T, H), seed=gen, low=-1.0, high=0.8),
            A=make_tensor((H,), seed=gen, low=-2.0, high=-0.1), B=make_tensor((b, T, G, N), seed=gen),
            C=make_tensor((b, T, G, N), seed=gen),
            D=None if D is None else make_tensor((H,) if D == "head" else (H, P), seed=gen),
            z=make_tensor((b, T, H, P), seed=gen) if opts else None,
            dt_bias=make_tensor((H,), seed=gen, low=-0.3, high=0.3) if opts else None,
            initial_states=make_tensor((b, H, P, N), seed=gen) if opts else None,
        )
        dout, dfinal = make_tensor((b, T, H, P), seed=gen), make_tensor((b, H, P, N), seed=gen)
        cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
        return {k: cast(v) for k, v in a.items()}, cast(dout), cast(dfinal)

    def reference(a, dout, dfinal, kw):
        leaves = {k: v.clone().requires_grad_(True) for k, v in a.items() if v is not None}
        y, f = ssd_reference(**leaves, **kw, return_final_states=True)
        g = torch.autograd.grad((y * dout).sum() + (f * dfinal).sum(), list(leaves.values()))
        return y.detach(), f.detach(), dict(zip(leaves, g))

    def kernels(a, dout, dfinal, kw, Q):
        y, f, bd = ssd_triton_fwd(**a, **kw, chunk_size=Q)
        assert bd.shape == (y.shape[0], y.shape[2], -(-y.shape[1] // Q), y.shape[3], f.shape[-1])
        grads = ssd_triton_bwd(**a, **kw, boundary_states=bd, dout=dout, dfinal=dfinal, chunk_size=Q)
        named = dict(zip(NAMES, grads))
        for k in NAMES:
            if a[k] is None:
                assert named[k] is None, k
            else:
                assert named[k].dtype == a[k].dtype and named[k].shape == a[k].shape, k
        return y, f, {k: g for k, g in named.items() if g is not None}

    for seed, (b, T, H, P, G, N, Q, D, opts, starts, limit) in enumerate(CASES):
        seq_idx = None
        if starts is not None:
            seq_idx = torch.zeros(b, T, dtype=torch.int32)
            for s in starts:
                seq_idx[:, s:] += 1
        kw = dict(dt_softplus=True, dt_limit=limit, seq_idx=seq_idx)
        a64, dout64, dfinal64 = inputs(seed, b, T, H, P, G, N, D, opts, torch.float64)
        want = reference(a64, dout64, dfinal64, kw)
        # float64 through the kernels: the same algorithm, exact up to round-off.
        got = kernels(a64, dout64, dfinal64, kw, Q)
        for name, x, r in (("y", got[0], want[0]), ("final", got[1], want[1])):
            assert_exact(x, r, name=f"case {seed} float64 {name}")
        for k in want[2]:
            assert_exact(got[2][k], want[2][k], name=f"case {seed} float64 d{k}")
        if Q in (4, 8):
            # Kernel chunks shorter than the saved chunks (with T < Q: kernel chunks wholly past
            # the end): the forward saves every S-th state,
            # the backward recomputes the ones inside a saved chunk from its entering state.
            ssd_triton.KERNEL_CHUNK = 2
            got = kernels(a64, dout64, dfinal64, kw, Q)
            ssd_triton.KERNEL_CHUNK = 64
            for name, x, r in (("y", got[0], want[0]), ("final", got[1], want[1])):
                assert_exact(x, r, name=f"case {seed} float64 kernel chunk 2 {name}")
            for k in want[2]:
                assert_exact(got[2][k], want[2][k], name=f"case {seed} float64 kernel chunk 2 d{k}")
        # float32: within twice the float32 reference's own error against float64.
        a32, dout32, dfinal32 = inputs(seed, b, T, H, P, G, N, D, opts, torch.float32)
        base = reference(a32, dout32, dfinal32, kw)
        got = kernels(a32, dout32, dfinal32, kw, Q)
        errs = {}
        for name, x, bl, r in (("y", got[0], base[0], want[0]), ("final", got[1], base[1], want[1])):
            errs[name] = assert_within_dtype_rule(x, bl, r, name=f"case {seed} float32 {name}")
        for k in want[2]:
            errs["d" + k] = assert_within_dtype_rule(got[2][k], base[2][k], want[2][k], name=f"case {seed} float32 d{k}")
        print(seed, {k: f"{e[0]:.1e}/{e[1]:.1e}" for k, e in errs.items()})

    # Fast decay (|A| in [100, 1000], float64 through the kernels): ∂L/∂(log a), hence dA and
    # the decay part of ddt, is a sum of tiny path terms next to O(1) per-pair terms; it must
    # keep a small error relative to each entry (README.md, "sum over paths").
    a, dout, dfinal = inputs(20, 2, 9, 2, 2, 1, 3, "head", True, torch.float64)
    gen = torch.Generator().manual_seed(21)
    a["dt"] = make_tensor(a["dt"].shape, seed=gen, low=0.2, high=0.5, dtype=torch.float64)
    a["A"] = make_tensor(a["A"].shape, seed=gen, low=-1000.0, high=-100.0, dtype=torch.float64)
    a["dt_bias"] = None
    seq_idx = torch.zeros(2, 9, dtype=torch.int64)
    seq_idx[:, 5:] = 1
    kw = dict(seq_idx=seq_idx)
    want = reference(a, dout, dfinal, kw)
    got = kernels(a, dout, dfinal, kw, 4)
    for name in ("A", "dt"):
        rel = ((got[2][name] - want[2][name]).abs() / want[2][name].abs().clamp_min(1e-250)).max().item()
        print("fast decay d" + name, f"{rel:.1e}")
        assert rel <= 1e-9, (name, rel)

    # The op's CUDA branch with the Triton functions (states flattened by the forward op and
    # restored by the backward op, zeros for omitted inputs), through autograd.
    import longctx_compiler.kernels.ssd.op as op
    from longctx_compiler.kernels.ssd import ssd_scan

    op._impl = lambda device: (ssd_triton_fwd, ssd_triton_bwd)
    b, T, H, P, G, N, Q, D, opts, starts, limit = CASES[4]
    seq_idx = torch.zeros(b, T, dtype=torch.int64)
    seq_idx[:, 4:] = 1
    a, dout, dfinal = inputs(10, b, T, H, P, G, N, D, opts, torch.float64)
    a["z"] = None
    want = reference(a, dout, dfinal, dict(dt_softplus=True, seq_idx=seq_idx))
    leaves = {k: v.clone().requires_grad_(True) for k, v in a.items() if v is not None}
    y, f = ssd_scan(**leaves, dt_softplus=True, seq_idx=seq_idx, chunk_size=Q, return_final_states=True)
    grads = torch.autograd.grad((y * dout).sum() + (f * dfinal).sum(), list(leaves.values()))
    assert_exact(y, want[0], name="op y")
    assert_exact(f, want[1], name="op final")
    for k, g in zip(leaves, grads):
        assert_exact(g, want[2][k], name=f"op d{k}")
    print("OK")
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
