"""Triton attention kernels under the CPU interpreter (``TRITON_INTERPRET=1``), fp32, tiny shapes.

``triton.jit`` picks interpreted or compiled functions when the kernel module is imported, so
the environment variable must be set before ``kernels/attention/triton.py`` is imported. Doing
that inside this pytest process would depend on test order (another test may already have
imported the module compiled). The checks therefore run in a fresh Python subprocess with
``TRITON_INTERPRET=1``: reliable alongside any other test, at the cost of one interpreter start.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import itertools, random
    import torch
    import torch.nn.functional as F
    from longctx_compiler.kernels.attention.reference import attention_reference_with_lse
    from longctx_compiler.kernels.attention.triton import triton_attention_forward, triton_attention_backward
    from longctx_compiler.kernels.attention import op as attn_op
    from longctx_compiler.runtime import HostPool
    from longctx_compiler.testing import make_tensor, assert_within_dtype_rule, relative_error

    def grads(out, lse, q, k, v, dout, dlse):
        return torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))

    cases = [
        # B, Hq, Hkv, T, S, D, chunk, causal
        (1, 2, 1, 13, 13, 5, 8, True),     # GQA, T not a multiple of the chunk, padded D
        (2, 2, 2, 7, 11, 16, 4, False),    # T != S
        (1, 4, 2, 20, 20, 8, 32, True),    # T < chunk
        (1, 2, 1, 5, 9, 3, 2, True),       # causal with T < S (top-left)
        (1, 1, 1, 1, 1, 4, 4, True),       # T = 1
        (1, 3, 1, 32, 32, 16, 16, True),   # two blocks per chunk pair in every kernel loop
    ]
    # Negative and zero scales (causal): ATen's CPU kernel gets these wrong; the Triton
    # kernels scale before masking, so they must match the reference.
    scaled = [(1, 2, 1, 13, 13, 5, 4, True, -0.5), (1, 2, 2, 9, 9, 8, 4, True, 0.0), (1, 2, 1, 7, 11, 4, 4, False, -1.5)]
    for (B, Hq, Hkv, T, S, D, c, causal, scale) in [case + (None,) for case in cases] + scaled:
        seed = 17 * T + S
        q64 = make_tensor((B, Hq, T, D), seed=seed, requires_grad=True)
        k64 = make_tensor((B, Hkv, S, D), seed=seed + 1, requires_grad=True)
        v64 = make_tensor((B, Hkv, S, D), seed=seed + 2, requires_grad=True)
        dout = make_tensor((B, Hq, T, D), seed=seed + 3)
        dlse = make_tensor((B, Hq, T), seed=seed + 4)
        ro, rl = attention_reference_with_lse(q64, k64, v64, causal=causal, scale=scale)
        rg = grads(ro, rl, q64, k64, v64, dout, dlse)
        q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
        bo, bl = attention_reference_with_lse(q, k, v, causal=causal, scale=scale)
        bg = grads(bo, bl, q, k, v, dout.float(), dlse.float())
        o, l = triton_attention_forward(q.detach(), k.detach(), v.detach(), causal=causal, scale=scale, chunk_size=c)
        g = triton_attention_backward(dout.float(), q.detach(), k.detach(), v.detach(), o, l, causal=causal,
                                      scale=scale, chunk_size=c, dlse=dlse.float())
        assert o.dtype == torch.float32 and l.dtype == torch.float32
        for name, cand, base, ref in zip(("out", "lse", "dq", "dk", "dv"), (o, l, *g), (bo, bl, *bg), (ro, rl, *rg)):
            assert_within_dtype_rule(cand, base, ref, name=f"{name} {(B, Hq, Hkv, T, S, D, c, causal)}")
        # The streamed offload backward (double-buffered prefetch loop used on CUDA), fed from
        # a CPU host pool: prefetches are views there, the loop and kernels are the same.
        pool = HostPool()
        hs = {n: pool.offload(t) for n, t in zip(("q", "k", "v", "out", "lse"), (q.detach(), k.detach(), v.detach(), o, l))}
        g_off = attn_op._offload_backward_cuda(dout.float(), hs, pool, dlse.float(), causal, 1.0 / D ** 0.5 if scale is None else scale, c)
        for a, b in zip(g_off, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("TRITON_INTERPRET_OK", len(cases) + len(scaled))
    """
)


def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "TRITON_INTERPRET_OK" in proc.stdout
