"""Sequence-pipelined decoder layers: one Llama training step's memory and time across T.

Issue 10's configuration (``transformers.LlamaForCausalLM``, hidden 256, 4 layers, 8/2 heads,
SwiGLU 688, vocabulary 16000, float32, SDPA, ``use_cache=False``), one training step
(forward, loss with labels, backward) per method, each run in its own subprocess:

``eager``       plain eager PyTorch (the baseline every ratio is taken against);
``checkpoint``  ``model.gradient_checkpointing_enable(use_reentrant=False)``;
``compile``     plain ``torch.compile(model, dynamic=True)`` with ``--compile-backend``;
``defaults``    ``optimize(model)`` with the default configuration (attention chunked and
                offloaded, the LM loss tiled, logits None in training; AOT-eager backend so the
                CPU compile stays short): what a user gets from one call;
``ours``        ``optimize(model)`` with every decoder layer pipelined along T
                (``PipelinedLayersPass``: chunks of ``--chunk-size`` tokens, layer inputs and
                K/V histories in the host pool).

Per run: the device peak of one step (:func:`longctx_compiler.memory.measure_step`, host pool
apart), the host tier's peak, and the step time (median of ``--repeats`` steps). The targets
of the issue are checked at the end (device peak ratios at the largest T, device growth per
token, host tier per token, step time against checkpointing). Step times on a shared CPU are
relative figures only.

Run: ``python -m benchmarks.run layers --help``.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_attention import _build_llama, _memory_fields, _quiet
from benchmarks.common import (
    OK, RESULTS_DIR, env_metadata, fmt_bytes, new_figure, parse_tokens, plot_series, ratio, report_progress, run_isolated,
    time_steps, token_label, write_results,
)

METHODS = ("eager", "checkpoint", "compile", "defaults", "ours")


def packed_positions(tokens: int, documents: int):
    """``position_ids [1, tokens]`` restarting at each of ``documents`` documents of
    ``⌈tokens / documents⌉`` tokens (the last one shorter): transformers' packed convention."""
    import torch

    return (torch.arange(tokens) % -(-tokens // documents))[None]


def layer_step(*, method: str, tokens: int, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
               intermediate: int, vocab: int, chunk_size: int, compile_backend: str, repeats: int, warmup_tokens: int,
               seed: int, documents: int = 1) -> dict[str, Any]:
    """One training step of the Llama with ``method``: memory of one profiled step, then time.
    With ``documents > 1`` each row packs that many documents (positions restarting)."""
    _quiet()
    import torch

    import longctx_compiler as lc
    from longctx_compiler.memory import measure_step
    from longctx_compiler.runtime import get_default_pool

    model = _build_llama(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                         intermediate=intermediate, vocab=vocab, max_tokens=tokens, seed=seed)
    run = model
    if method == "checkpoint":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif method == "compile":
        run = torch.compile(model, backend=compile_backend, dynamic=True)
    elif method == "defaults":
        run = lc.optimize(model, backend="aot_eager")
    elif method == "ours":
        run = lc.optimize(model, backend="aot_eager", attention={"chunk_size": chunk_size, "offload": True},
                          layers={"enabled": True, "chunk_size": chunk_size, "offload": True})
    elif method != "eager":
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)

    def step_on(x):
        extra = {"position_ids": packed_positions(x.shape[1], documents)} if documents > 1 else {}
        run(x, labels=x, use_cache=False, **extra).loss.backward()

    def zero():
        model.zero_grad(set_to_none=True)
        gc.collect()

    out: dict[str, Any] = {"method": method, "tokens": tokens, "documents": documents}
    t0 = time.perf_counter()
    step_on(torch.randint(0, vocab, (1, min(warmup_tokens, tokens)), generator=gen))
    out["warmup_s"] = time.perf_counter() - t0
    if method in ("defaults", "ours"):
        out["rewrites"] = {p: run.report.count(p) for p in ("pipelined_layers", "chunked_attention", "tiled_lm_loss")}
    zero()
    mem = measure_step(lambda: step_on(ids), parameters=model, host_pool=get_default_pool())
    out.update(_memory_fields(mem))
    report_progress(out)
    timing = time_steps(lambda: step_on(ids), repeats=repeats, before_each=zero)
    out["step_s"] = timing["median_s"]
    return out


def check_targets(records: list[dict[str, Any]], hidden: int, layers: int, kv_dim: int) -> list[dict[str, Any]]:
    """Issue 10's four targets, from the largest T every method ran at and the smallest."""
    def find(m, t):
        return next((r for r in records if r["method"] == m and r["tokens"] == t and r["status"] == OK), None)

    ts = sorted({r["tokens"] for r in records if r["method"] == "ours" and r["status"] == OK})
    if not ts:
        return []
    lo, hi = ts[0], ts[-1]
    ours_hi, ours_lo = find("ours", hi), find("ours", lo)
    out = []
    for base, factor in (("eager", 20), ("checkpoint", 10)):
        b = find(base, hi)
        if b:
            got = b["peak_bytes"] / ours_hi["peak_bytes"]
            out.append({"target": f"device peak >= {factor}x below {base} at {token_label(hi)}", "value": round(got, 2), "met": got >= factor})
    if hi > lo:
        growth = (ours_hi["peak_bytes"] - ours_lo["peak_bytes"]) / (hi - lo)
        out.append({"target": "device growth per token <= 3 x hidden x 4 B", "value": round(growth, 1), "limit": 3 * hidden * 4,
                    "met": growth <= 3 * hidden * 4})
    host = ours_hi["host_bytes"] / hi
    out.append({"target": "host tier per token <= 1.5 x layers x (hidden + 2 kv_dim) x 4 B", "value": round(host, 1),
                "limit": 1.5 * layers * (hidden + 2 * kv_dim) * 4, "met": host <= 1.5 * layers * (hidden + 2 * kv_dim) * 4})
    ck = find("checkpoint", hi)
    if ck:
        r = ours_hi["step_s"] / ck["step_s"]
        out.append({"target": "step time <= 1.5x checkpointing's", "value": round(r, 2), "met": r <= 1.5})
    return out


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run layers", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", nargs="+", default=["8K", "16K", "32K"], help="sequence lengths (8K = 8192)")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if m != "defaults"], choices=METHODS)
    p.add_argument("--chunk-size", type=int, default=1024, help="tokens per layer chunk (and attention chunk)")
    p.add_argument("--compile-backend", default="inductor", help="backend of the plain torch.compile baseline")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=688)
    p.add_argument("--vocab", type=int, default=16000)
    p.add_argument("--documents", type=int, default=1, help="packed documents per row (position_ids restarting at each)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=1800.0, help="wall-clock seconds per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "layers_cpu.json")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.tokens = sorted(set(parse_tokens(args.tokens)))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    kwargs = dict(layers=args.layers, hidden=args.hidden, heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim,
                  intermediate=args.intermediate, vocab=args.vocab, chunk_size=args.chunk_size, compile_backend=args.compile_backend,
                  repeats=args.repeats, warmup_tokens=args.warmup_tokens, seed=args.seed, documents=args.documents)
    records = []
    for t in args.tokens:
        for m in args.methods:
            rec = run_isolated("benchmarks.bench_layers", "layer_step", dict(kwargs, method=m, tokens=t), timeout_s=args.timeout)
            row = {"method": m, "tokens": t, "status": rec["status"], **(rec.get("result") or rec.get("progress") or {})}
            if rec["status"] != OK:
                row["error"] = (rec.get("error") or "")[-500:]
            records.append(row)
            print(f"{token_label(t):>5} {m:<10} {rec['status']:<8} peak {fmt_bytes(row.get('peak_bytes'))}"
                  f"  host {fmt_bytes(row.get('host_bytes'))}  step {row.get('step_s', float('nan')):.1f} s", flush=True)
    for r in records:
        base = next((b for b in records if b["method"] == "eager" and b["tokens"] == r["tokens"] and b["status"] == OK), None)
        r["peak_vs_eager"] = ratio(r.get("peak_bytes"), base and base.get("peak_bytes"))
    targets = check_targets(records, args.hidden, args.layers, args.kv_heads * args.head_dim)
    for tg in targets:
        print(("MET    " if tg["met"] else "NOT MET ") + f"{tg['target']}: {tg['value']}")
    doc = {"benchmark": "layers", "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
           "env": env_metadata(), "records": records, "targets": targets,
           "notes": ["peak_bytes: device (here CPU) high-water mark of one step, host-pool buffers excluded; host_bytes: the pool's peak.",
                     "Step times on a shared CPU are relative figures only."]}
    path = write_results(args.out, doc)
    if not args.no_plot:
        fig, axes = new_figure(1, 1)
        series = {m: [(r["tokens"], r.get("peak_bytes") and r["peak_bytes"] / 2**20) for r in records if r["method"] == m and r["status"] == OK]
                  for m in args.methods}
        plot_series(axes[0][0], series, title="Llama training step, device peak",
                    xlabel="tokens", ylabel="MiB")
        fig.savefig(Path(path).with_suffix(".png"), dpi=120)
    print(f"wrote {path}")
    return 0
