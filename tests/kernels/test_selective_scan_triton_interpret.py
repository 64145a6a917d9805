"""Triton kernels of the selective scan, run on CPU under TRITON_INTERPRET=1.

The interpreter must be chosen before triton is first imported, and other tests in the same
pytest process import triton normally; so the check runs in a fresh Python subprocess with
``TRITON_INTERPRET=1`` in its environment (fp32, tiny shapes) and reports back through its
exit status and output.
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
    from longctx_compiler.kernels.selective_scan import selective_scan_reference
    from longctx_compiler.kernels.selective_scan.triton import selective_scan_triton_bwd, selective_scan_triton_fwd
    from longctx_compiler.testing import make_tensor, relative_error

    CASES = [  # batch, dim, dstate, T, chunk, groups, optionals, mode, window
        (2, 4, 3, 7, 3, 0, True, "exact", None),
        (1, 6, 2, 9, 4, 3, False, "exact", None),
        (1, 4, 5, 5, 8, 2, True, "exact", None),   # T < chunk, N not a power of 2
        (2, 4, 3, 9, 4, 2, True, "truncated", 3),
        (1, 2, 2, 1, 4, 0, True, "exact", None),   # T = 1
        (1, 4, 3, 23, 2, 2, True, "exact", None),  # M = 12 chunks: the blocked boundary scans
        (1, 2, 2, 11, 1, 0, True, "truncated", 4),  # chunk size 1: M = T
    ]
    worst = 0.0
    for seed, (b, d, n, T, Q, G, opts, mode, W) in enumerate(CASES):
        gen = torch.Generator().manual_seed(seed)
        bc = (b, G, n, T) if G else (b, n, T)
        a = dict(
            u=make_tensor((b, d, T), seed=gen), delta=make_tensor((b, d, T), seed=gen, low=-0.5, high=0.8),
            A=make_tensor((d, n), seed=gen, low=-2.0, high=-0.05), B=make_tensor(bc, seed=gen), C=make_tensor(bc, seed=gen),
            D=make_tensor((d,), seed=gen) if opts else None, z=make_tensor((b, d, T), seed=gen) if opts else None,
            delta_bias=make_tensor((d,), seed=gen) if opts else None, h0=make_tensor((b, d, n), seed=gen),
        )
        dy, dh = make_tensor((b, d, T), seed=gen), make_tensor((b, d, n), seed=gen)
        names = [k for k, v in a.items() if v is not None]
        # float64 reference gradients; the window is applied by comparing against the
        # chunked torch backward in float64 (itself tested against windowed VJP sums).
        ref = {k: v.clone().requires_grad_(True) for k, v in a.items() if v is not None}
        y_r, f_r = selective_scan_reference(**ref, delta_softplus=opts, return_final_state=True)
        g_r = dict(zip(names, torch.autograd.grad((y_r * dy).sum() + (f_r * dh).sum(), list(ref.values()))))
        if mode == "truncated":
            from longctx_compiler.kernels.selective_scan import selective_scan_chunked_bwd, selective_scan_chunked_fwd
            _, _, bd = selective_scan_chunked_fwd(**a, delta_softplus=opts, chunk_size=Q)
            gt = selective_scan_chunked_bwd(**a, delta_softplus=opts, boundary_states=bd, dy=dy, dfinal=dh, chunk_size=Q, mode=mode, window=W)
            g_r = dict(zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"], gt))
        a32 = {k: None if v is None else v.float() for k, v in a.items()}
        y, f, bd = selective_scan_triton_fwd(**a32, delta_softplus=opts, chunk_size=Q)
        grads = selective_scan_triton_bwd(**a32, delta_softplus=opts, boundary_states=bd, dy=dy.float(), dfinal=dh.float(), chunk_size=Q, mode=mode, window=W)
        errs = {"y": relative_error(y, y_r), "final": relative_error(f, f_r)}
        for k, g in zip(["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "h0"], grads):
            if a[k] is None:
                assert g is None, k
                continue
            assert g.dtype == torch.float32 and g.shape == a[k].shape, k
            errs["d" + k] = relative_error(g, g_r[k])
        print(seed, {k: f"{e:.1e}" for k, e in errs.items()})
        worst = max(worst, max(errs.values()))
    # fp32 kernels against float64 truth on O(10)-step recurrences.
    assert worst < 1e-5, worst

    # Extreme decay (|A| in [100, 1000], float64 through the kernels): dA and dΔ are tiny
    # (products of decays like e^-50) and must keep a small *relative* error, channel by
    # channel: the log-decay telescoping sums terms that are themselves O(decay), never O(1)
    # terms that cancel (README.md, "no cancellation").
    gen = torch.Generator().manual_seed(99)
    b, d, n, T, Q = 1, 3, 2, 9, 4
    a = dict(
        u=make_tensor((b, d, T), seed=gen), delta=make_tensor((b, d, T), seed=gen, low=0.05, high=0.5),
        A=make_tensor((d, n), seed=gen, low=-1000.0, high=-100.0), B=make_tensor((b, n, T), seed=gen),
        C=make_tensor((b, n, T), seed=gen), h0=make_tensor((b, d, n), seed=gen),
    )
    dy, dh = make_tensor((b, d, T), seed=gen), make_tensor((b, d, n), seed=gen)
    ref = {k: v.clone().requires_grad_(True) for k, v in a.items()}
    y_r, f_r = selective_scan_reference(**ref, return_final_state=True)
    g_r = torch.autograd.grad((y_r * dy).sum() + (f_r * dh).sum(), [ref["A"], ref["delta"]])
    _, _, bd = selective_scan_triton_fwd(**a, chunk_size=Q)
    g = selective_scan_triton_bwd(**a, D=None, z=None, delta_bias=None, delta_softplus=False, boundary_states=bd, dy=dy, dfinal=dh, chunk_size=Q)
    for got, want, name in ((g[2], g_r[0], "dA"), (g[1], g_r[1], "ddelta")):
        rel = ((got - want).abs() / want.abs().clamp_min(1e-300)).max().item()
        print(name, f"{want.abs().min().item():.1e}", f"{rel:.1e}")
        assert rel < 1e-9, (name, rel)

    # Packed documents (seq_idx), float64 through the kernels: exact against the float64
    # reference (truncated: against the chunked torch backward, itself tested against windowed
    # VJP sums). Layouts: starts at a chunk's first token, mid-chunk, length-1 documents, a
    # ragged last chunk, batch rows with different layouts, a row with one document.
    DOCS = [  # batch, dim, dstate, T, chunk, groups, seq_idx rows, mode, window
        (2, 4, 3, 10, 4, 2, [[0, 0, 0, 0, 1, 1, 1, 2, 2, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]], "exact", None),
        (2, 2, 2, 7, 3, 0, [[5, 5, 5, 5, 5, 5, 5], [0, 0, 1, 1, 1, 1, 2]], "exact", None),
        (1, 4, 3, 9, 2, 0, [[0, 0, 1, 2, 2, 2, 3, 3, 3]], "exact", None),
        (1, 2, 2, 5, 8, 0, [[0, 1, 1, 1, 2]], "exact", None),  # T < chunk
        (2, 4, 2, 9, 4, 2, [[0, 0, 0, 0, 1, 1, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 1, 1]], "truncated", 3),
        (1, 2, 2, 8, 1, 0, [[0, 0, 1, 1, 1, 1, 1, 2]], "truncated", 2),  # last window holds a reset
    ]
    from longctx_compiler.kernels.selective_scan import selective_scan_chunked_bwd, selective_scan_chunked_fwd
    worst_docs = 0.0
    for seed, (b, d, n, T, Q, G, rows, mode, W) in enumerate(DOCS):
        gen = torch.Generator().manual_seed(100 + seed)
        bc = (b, G, n, T) if G else (b, n, T)
        a = dict(
            u=make_tensor((b, d, T), seed=gen), delta=make_tensor((b, d, T), seed=gen, low=-0.5, high=0.8),
            A=make_tensor((d, n), seed=gen, low=-2.0, high=-0.05), B=make_tensor(bc, seed=gen), C=make_tensor(bc, seed=gen),
            D=make_tensor((d,), seed=gen), z=make_tensor((b, d, T), seed=gen),
            delta_bias=make_tensor((d,), seed=gen), h0=make_tensor((b, d, n), seed=gen),
        )
        seq_idx = torch.tensor(rows, dtype=torch.int32 if seed % 2 else torch.int64)
        dy, dh = make_tensor((b, d, T), seed=gen), make_tensor((b, d, n), seed=gen)
        names = list(a)
        ref = {k: v.clone().requires_grad_(True) for k, v in a.items()}
        y_r, f_r = selective_scan_reference(**ref, delta_softplus=True, return_final_state=True, seq_idx=seq_idx)
        g_r = dict(zip(names, torch.autograd.grad((y_r * dy).sum() + (f_r * dh).sum(), list(ref.values()))))
        if mode == "truncated":
            _, _, bd = selective_scan_chunked_fwd(**a, delta_softplus=True, chunk_size=Q, seq_idx=seq_idx)
            gt = selective_scan_chunked_bwd(**a, delta_softplus=True, boundary_states=bd, dy=dy, dfinal=dh, chunk_size=Q,
                                            mode=mode, window=W, seq_idx=seq_idx)
            g_r = dict(zip(names, gt))
        y, f, bd = selective_scan_triton_fwd(**a, delta_softplus=True, chunk_size=Q, seq_idx=seq_idx)
        grads = selective_scan_triton_bwd(**a, delta_softplus=True, boundary_states=bd, dy=dy, dfinal=dh, chunk_size=Q,
                                          mode=mode, window=W, seq_idx=seq_idx)
        errs = {"y": relative_error(y, y_r), "final": relative_error(f, f_r)}
        for k, g in zip(names, grads):
            assert g.dtype == torch.float64 and g.shape == a[k].shape, k
            errs["d" + k] = relative_error(g, g_r[k])
        print("docs", seed, {k: f"{e:.1e}" for k, e in errs.items()})
        worst_docs = max(worst_docs, max(errs.values()))
    assert worst_docs < 1e-10, worst_docs
    print("OK", worst, worst_docs)
    """
)


def test_triton_kernels_under_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout
