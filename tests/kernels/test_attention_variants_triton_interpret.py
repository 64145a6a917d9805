"""Window, soft-cap, sinks, document ids (packed sequences) and key ids (padding) in the Triton
attention kernels under the CPU interpreter (``TRITON_INTERPRET=1``), fp32, tiny shapes.

As in ``test_attention_triton_interpret.py``, the checks run in a fresh Python subprocess with
``TRITON_INTERPRET=1`` set before triton is imported. Errors are judged by the dtype rule:
at most 2x the fp32 reference's own error against the float64 reference.
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
    import torch
    from longctx_compiler.kernels.attention.reference import attention_reference_with_lse
    from longctx_compiler.kernels.attention.triton import triton_attention_forward, triton_attention_backward
    from longctx_compiler.kernels.attention import chunked as attn_chunked
    from longctx_compiler.kernels.attention import op as attn_op
    from longctx_compiler.runtime import HostPool
    from longctx_compiler.testing import make_tensor, assert_within_dtype_rule

    def leaves(q, k, v, sinks):
        return (q, k, v) if sinks is None else (q, k, v, sinks)

    def grads(out, lse, ins, dout, dlse):
        return torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), ins)

    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    cases = [
        # B, Hq, Hkv, T, S, D, chunk, window, softcap, sinks
        (1, 2, 1, 40, 40, 4, 16, 5, 0.0, False),   # window < chunk, two blocks per chunk
        (1, 2, 1, 37, 37, 8, 8, 20, 0.0, True),    # window > chunk, GQA
        (1, 1, 1, 9, 9, 4, 4, 12, 1.5, True),      # T < window
        (1, 1, 1, 16, 16, 4, 16, 16, 0.0, False),  # T = window = chunk
        (1, 2, 2, 20, 7, 4, 4, 3, 0.7, True),      # T > S: rows past the last key see none
        (1, 2, 1, 5, 9, 3, 2, 2, 0.0, True),       # T < S
        (2, 2, 1, 13, 13, 5, 8, 0, 2.0, True),     # soft-cap and sinks without a window
        (1, 2, 2, 11, 11, 16, 4, 0, 0.5, False),   # soft-cap alone, non-multiple T
    ]
    for (B, Hq, Hkv, T, S, D, c, window, softcap, with_sinks) in cases:
        seed = 17 * T + S + window
        q64 = make_tensor((B, Hq, T, D), seed=seed, low=-2, high=2, requires_grad=True)
        k64 = make_tensor((B, Hkv, S, D), seed=seed + 1, low=-2, high=2, requires_grad=True)
        v64 = make_tensor((B, Hkv, S, D), seed=seed + 2, requires_grad=True)
        s64 = make_tensor((Hq,), seed=seed + 3, requires_grad=True) if with_sinks else None
        dout = make_tensor((B, Hq, T, D), seed=seed + 4)
        dlse = make_tensor((B, Hq, T), seed=seed + 5)
        kw = dict(causal=True, scale=0.7, window=window, softcap=softcap)
        ro, rl = attention_reference_with_lse(q64, k64, v64, sinks=s64, **kw)
        rg = grads(ro, rl, leaves(q64, k64, v64, s64), dout, dlse)
        q, k, v, sinks = (None if t is None else t.detach().float().requires_grad_() for t in (q64, k64, v64, s64))
        bo, bl = attention_reference_with_lse(q, k, v, sinks=sinks, **kw)
        bg = grads(bo, bl, leaves(q, k, v, sinks), dout.float(), dlse.float())
        q, k, v, sinks = (None if t is None else t.detach() for t in (q, k, v, sinks))
        o, l = triton_attention_forward(q, k, v, chunk_size=c, sinks=sinks, **kw)
        g = triton_attention_backward(dout.float(), q, k, v, o, l, chunk_size=c, dlse=dlse.float(), sinks=sinks, **kw)
        assert len(g) == (4 if with_sinks else 3)
        case = (B, Hq, Hkv, T, S, D, c, window, softcap, with_sinks)
        empty = rl == float("-inf")
        assert torch.equal(l == float("-inf"), empty), case
        l, bl, rl = (t.masked_fill(empty, 0.0) for t in (l, bl, rl))
        for name, cand, base, ref in zip(names, (o, l, *g), (bo, bl, *bg), (ro, rl, *rg)):
            assert_within_dtype_rule(cand, base, ref, name=f"{name} {case}")
        # The streamed offload backward (the CUDA prefetch loop), fed from a CPU host pool.
        pool = HostPool()
        hs = {n: pool.offload(t) for n, t in zip(("q", "k", "v", "out", "lse"), (q, k, v, o, l.masked_fill(empty, float("-inf"))))}
        g_off = attn_op._offload_backward_cuda(dout.float(), hs, pool, dlse.float(), True, 0.7, c, window, softcap, sinks)
        assert len(g_off) == len(g)
        for a, b in zip(g_off, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # A nan in value row p reaches no query chunk whose pair with p's key chunk is skipped,
    # in out or dq: the pair is never launched (a launched pair would multiply it by P = 0).
    T, c, window, p = 48, 8, 6, 20
    q = make_tensor((1, 2, T, 4), seed=1, dtype=torch.float32)
    k = make_tensor((1, 1, T, 4), seed=2, dtype=torch.float32)
    v = make_tensor((1, 1, T, 4), seed=3, dtype=torch.float32)
    v[0, 0, p, 0] = float("nan")
    sinks = make_tensor((2,), seed=4, dtype=torch.float32)
    kw = dict(causal=True, scale=0.5, chunk_size=c, window=window, softcap=1.0, sinks=sinks)
    o, l = triton_attention_forward(q, k, v, **kw)
    dq, dk, dv, ds = triton_attention_backward(torch.ones_like(o), q, k, v, o, l, **kw)
    computed = {(qs, ks) for (qs, _), inner in attn_chunked.chunk_schedule(T, T, c, True, window=window) for ks, _ in inner}
    skipped = [qs for qs in range(0, T, c) if (qs, (p // c) * c) not in computed]
    assert skipped
    for qs in skipped:
        assert torch.isfinite(o[:, :, qs:qs + c]).all() and torch.isfinite(dq[:, :, qs:qs + c]).all(), qs
    assert torch.isnan(o[:, :, p:p + window]).any(dim=-1).all()
    print("TRITON_INTERPRET_VARIANTS_OK", len(cases))

    # Documents (packed sequences): segment_ids alone and with the other variants.
    def ids_from(rows, dtype):
        # One row of document lengths per batch row -> [B, T] nondecreasing ids.
        return torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in rows]).to(dtype)

    cases = [
        # B, Hq, Hkv, D, chunk, causal, window, softcap, sinks, document lengths per row (or "unsorted")
        (1, 2, 1, 4, 8, True, 0, 0.0, False, [[5, 1, 14, 1, 19]]),         # 1-token documents, mid-chunk edges, GQA
        (2, 2, 2, 8, 8, True, 0, 0.0, True, [[16, 16], [3, 29]]),          # chunk-aligned (one-document pairs) and not
        (1, 2, 1, 4, 4, True, 3, 1.5, True, [[7, 2, 11, 5]]),              # with a window and a soft-cap
        (1, 1, 1, 5, 16, False, 0, 0.0, False, [[9, 12, 2]]),              # non-causal, two blocks per chunk pair
        (2, 2, 1, 4, 32, True, 0, 0.0, False, [[1] * 13, [13]]),           # one pair: T < chunk; 13 one-token documents
        (1, 2, 1, 4, 4, True, 0, 0.7, False, "unsorted"),                  # unsorted ids
    ]
    for idx, (B, Hq, Hkv, D, c, causal, window, softcap, with_sinks, docs) in enumerate(cases):
        seed = 31 * idx + 7
        if docs == "unsorted":
            T = 18
            ids = torch.randint(0, 3, (B, T), generator=torch.Generator().manual_seed(seed), dtype=torch.int64)
        else:
            ids = ids_from(docs, torch.int32 if idx % 2 else torch.int64)
            T = ids.shape[1]
        q64 = make_tensor((B, Hq, T, D), seed=seed, low=-2, high=2, requires_grad=True)
        k64 = make_tensor((B, Hkv, T, D), seed=seed + 1, low=-2, high=2, requires_grad=True)
        v64 = make_tensor((B, Hkv, T, D), seed=seed + 2, requires_grad=True)
        s64 = make_tensor((Hq,), seed=seed + 3, requires_grad=True) if with_sinks else None
        dout = make_tensor((B, Hq, T, D), seed=seed + 4)
        dlse = make_tensor((B, Hq, T), seed=seed + 5)
        kw = dict(causal=causal, scale=0.7, window=window, softcap=softcap, segment_ids=ids)
        ro, rl = attention_reference_with_lse(q64, k64, v64, sinks=s64, **kw)
        rg = grads(ro, rl, leaves(q64, k64, v64, s64), dout, dlse)
        q, k, v, sinks = (None if t is None else t.detach().float().requires_grad_() for t in (q64, k64, v64, s64))
        bo, bl = attention_reference_with_lse(q, k, v, sinks=sinks, **kw)
        bg = grads(bo, bl, leaves(q, k, v, sinks), dout.float(), dlse.float())
        q, k, v, sinks = (None if t is None else t.detach() for t in (q, k, v, sinks))
        o, l = triton_attention_forward(q, k, v, chunk_size=c, sinks=sinks, **kw)
        g = triton_attention_backward(dout.float(), q, k, v, o, l, chunk_size=c, dlse=dlse.float(), sinks=sinks, **kw)
        assert len(g) == (4 if with_sinks else 3)
        case = (B, Hq, Hkv, T, D, c, causal, window, softcap, with_sinks, docs)
        assert torch.isfinite(l).all(), case
        for name, cand, base, ref in zip(names, (o, l, *g), (bo, bl, *bg), (ro, rl, *rg)):
            assert_within_dtype_rule(cand, base, ref, name=f"{name} {case}")
        # The streamed offload backward (the CUDA prefetch loop), fed from a CPU host pool.
        pool = HostPool()
        hs = {n: pool.offload(t) for n, t in zip(("q", "k", "v", "out", "lse"), (q, k, v, o, l))}
        g_off = attn_op._offload_backward_cuda(dout.float(), hs, pool, dlse.float(), causal, 0.7, c, window, softcap, sinks, ids)
        assert len(g_off) == len(g)
        for a, b in zip(g_off, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # Skipped document pairs are never launched either: a nan in value row p of one document reaches no query
    # chunk whose pair with p's key chunk is skipped, in out or dq (a launched pair would
    # multiply it by P = 0); the document's own later queries are nan.
    T, c, p = 48, 8, 13
    ids = ids_from([[10, 9, 15, 14]], torch.int64)   # p in document [10, 19)
    q = make_tensor((1, 2, T, 4), seed=1, dtype=torch.float32)
    k = make_tensor((1, 1, T, 4), seed=2, dtype=torch.float32)
    v = make_tensor((1, 1, T, 4), seed=3, dtype=torch.float32)
    v[0, 0, p, 0] = float("nan")
    kw = dict(causal=True, scale=0.5, chunk_size=c, segment_ids=ids)
    o, l = triton_attention_forward(q, k, v, **kw)
    dq, dk, dv = triton_attention_backward(torch.ones_like(o), q, k, v, o, l, **kw)
    docs = attn_chunked.Documents(ids, c)
    computed = {(qs, ks) for (qs, _), inner in attn_chunked.chunk_schedule(T, T, c, True, documents=docs) for ks, _ in inner}
    skipped = [qs for qs in range(0, T, c) if (qs, (p // c) * c) not in computed]
    assert len(skipped) >= 3, skipped
    for qs in skipped:
        assert torch.isfinite(o[:, :, qs:qs + c]).all() and torch.isfinite(dq[:, :, qs:qs + c]).all(), qs
    assert torch.isnan(o[:, :, p:19]).any(dim=-1).all()
    print("TRITON_INTERPRET_DOCUMENTS_OK", len(cases))

    # Key ids (padding): query ids 0 (or document ids), key ids -1 at pads. Left padding and
    # pads that open a document leave rows without a key: out 0, lse -inf (the sink), dq 0.
    cases = [
        # B, Hq, Hkv, D, chunk, window, softcap, sinks, query ids, key ids
        (2, 2, 1, 4, 8, 0, 0.0, False, [[0] * 21, [0] * 21], [[0] * 15 + [-1] * 6, [0] * 20 + [-1]]),   # right padding
        (2, 2, 1, 4, 8, 0, 0.0, True, [[0] * 21, [0] * 21], [[-1] * 10 + [0] * 11, [-1] * 3 + [0] * 18]),  # left padding
        (1, 2, 2, 4, 4, 3, 1.5, True, [[0] * 18], [[-1] * 5 + [0] * 9 + [-1] * 4]),                    # both, window
        (1, 2, 1, 4, 4, 0, 0.0, False, [[0] * 6 + [1] * 9 + [2] * 5],
         [[0] * 4 + [-1] * 2 + [-1] * 3 + [1] * 6 + [2] * 5]),                                            # documents
    ]
    for idx, (B, Hq, Hkv, D, c, window, softcap, with_sinks, qids, kids) in enumerate(cases):
        seed = 13 * idx + 3
        ids = torch.tensor(qids, dtype=torch.int64)
        keys = torch.tensor(kids, dtype=torch.int32 if idx % 2 else torch.int64)
        T = ids.shape[1]
        q64 = make_tensor((B, Hq, T, D), seed=seed, low=-2, high=2, requires_grad=True)
        k64 = make_tensor((B, Hkv, T, D), seed=seed + 1, low=-2, high=2, requires_grad=True)
        v64 = make_tensor((B, Hkv, T, D), seed=seed + 2, requires_grad=True)
        s64 = make_tensor((Hq,), seed=seed + 3, requires_grad=True) if with_sinks else None
        dout = make_tensor((B, Hq, T, D), seed=seed + 4)
        kw = dict(causal=True, scale=0.7, window=window, softcap=softcap, segment_ids=ids, key_segment_ids=keys)
        ro, rl = attention_reference_with_lse(q64, k64, v64, sinks=s64, **kw)
        # No lse cotangent: the reference's is nan through a row without keys.
        dlse = torch.zeros((B, Hq, T), dtype=torch.float64)
        rg = grads(ro, rl, leaves(q64, k64, v64, s64), dout, dlse)
        q, k, v, sinks = (None if t is None else t.detach().float().requires_grad_() for t in (q64, k64, v64, s64))
        bo, bl = attention_reference_with_lse(q, k, v, sinks=sinks, **kw)
        bg = grads(bo, bl, leaves(q, k, v, sinks), dout.float(), dlse.float())
        q, k, v, sinks = (None if t is None else t.detach() for t in (q, k, v, sinks))
        o, l = triton_attention_forward(q, k, v, chunk_size=c, sinks=sinks, **kw)
        g = triton_attention_backward(dout.float(), q, k, v, o, l, chunk_size=c, sinks=sinks, **kw)
        case = (idx, B, Hq, Hkv, T, D, c, window, softcap, with_sinks)
        empty = ~attn_chunked.rows_see_keys(ids, keys, True, window).unsqueeze(1).expand(B, Hq, T)
        assert bool(empty.any()) == (idx > 0), case
        assert torch.equal(l == float("-inf"), empty if sinks is None else torch.zeros_like(empty)), case
        assert bool((o[empty] == 0).all()) and bool((g[0][empty] == 0).all()), case
        assert all(torch.isfinite(t).all() for t in (o, *g)), case
        l, bl, rl = (t.masked_fill(empty, 0.0) for t in (l, bl, rl))
        for name, cand, base, ref in zip(names, (o, l, *g), (bo, bl, *bg), (ro, rl, *rg)):
            assert_within_dtype_rule(cand, base, ref, name=f"{name} {case}")
        # The streamed offload backward (the CUDA prefetch loop), fed from a CPU host pool.
        pool = HostPool()
        l_saved = l if sinks is not None else l.masked_fill(empty, float("-inf"))
        hs = {n: pool.offload(t) for n, t in zip(("q", "k", "v", "out", "lse"), (q, k, v, o, l_saved))}
        g_off = attn_op._offload_backward_cuda(dout.float(), hs, pool, None, True, 0.7, c, window, softcap, sinks, ids, keys)
        assert len(g_off) == len(g)
        for a, b in zip(g_off, g):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    print("TRITON_INTERPRET_PADDING_OK", len(cases))
    """
)


def test_triton_variant_and_document_kernels_match_reference_under_interpreter():
    # Also the key ids' (padding) cases: rows without a key in the forward and both backwards.
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "TRITON_INTERPRET_VARIANTS_OK" in proc.stdout and "TRITON_INTERPRET_DOCUMENTS_OK" in proc.stdout and "TRITON_INTERPRET_PADDING_OK" in proc.stdout
