"""What sliding windows and packed documents save in chunked attention: step time and memory.

The attention core alone, on ``bench_attention``'s attention-only shapes (q ``[1, H, T, Dh]``,
k/v ``[1, Hkv, T, Dh]``, float32, batch 1): one forward of
``longctx_compiler.kernels.attention.chunked_attention(q, k, v, causal=True, chunk_size=C)``,
loss ``out.sum()``, backward. Methods, each configuration in its own subprocess
(:func:`benchmarks.common.run_isolated`):

  ``causal``      fully causal, no ids (the baseline every ratio is taken against);
  ``window``      the same with ``window=W``: chunk pairs outside the band are skipped;
  ``documents``   ``N`` packed documents of ``T / N`` tokens in the one row
                  (``segment_ids`` = document index per token, int64 ``[1, T]``): chunk
                  pairs whose chunks share no document are skipped.

Per run: one warm-up step, one step under :func:`longctx_compiler.memory.measure_step`
(peak bytes and the bytes autograd saved for backward), then ``--repeats`` timed steps
(``step_s`` is their median). Per method and T the benchmark also counts the chunk pairs the
op's schedule computes (``chunked.chunk_schedule`` with ``window=`` / ``documents=``) and how
many of them are masked (``chunked.pair_needs_mask``), as a fraction of causal's pairs: the
work ratio the time ratio is read against.

Targets (printed as PASS/FAIL, never asserted), at the largest measured T:

1. window: step time ≤ 0.3× causal's, and the bytes saved for backward equal causal's;
2. documents: step time ≤ 0.2× causal's.

The targets are stated for T = 32K, W = 4096, 8 documents, chunk 512 (the defaults); other
settings are judged the same way and say so (``at_stated_size``). Step times on a shared CPU
are relative figures only. Run: ``python -m benchmarks.run masks --help``.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    OK, OOM, RESULTS_DIR, TIMEOUT, StepTimeout, env_metadata, fmt_bytes, new_figure, parse_tokens, plot_series, ratio,
    report_progress, run_isolated, time_steps, token_label, write_results,
)

METHODS = ("causal", "window", "documents")
BASELINE = "causal"
#: The size the targets are stated for.
STATED = {"tokens": 32768, "window": 4096, "documents": 8, "chunk_size": 512}
WINDOW_TIME_TARGET = 0.3
DOCUMENTS_TIME_TARGET = 0.2


# ------------------------------------------------------------------------------ helpers
def segment_ids_for(tokens: int, documents: int):
    """``[1, T]`` int64: document index per token, ``documents`` consecutive documents of
    (nearly) equal length (exactly ``T / documents`` when it divides)."""
    import torch

    return (torch.arange(tokens, dtype=torch.int64) * documents // tokens).unsqueeze(0)


def method_options(method: str, tokens: int, window: int, documents: int) -> dict[str, Any]:
    """The op's mask arguments of ``method``: ``{"window": int, "segment_ids": tensor or None}``."""
    if method == "causal":
        return {"window": 0, "segment_ids": None}
    if method == "window":
        return {"window": window, "segment_ids": None}
    if method == "documents":
        return {"window": 0, "segment_ids": segment_ids_for(tokens, documents)}
    raise ValueError(f"unknown method {method!r}; one of {METHODS}")


def schedule_counts(method: str, tokens: int, chunk_size: int, window: int, documents: int) -> dict[str, int]:
    """Chunk pairs the op computes for ``method`` (its forward schedule; the backward's holds
    the same pairs) and how many of those are masked; ``causal_pairs`` for comparison."""
    from longctx_compiler.kernels.attention.chunked import Documents, chunk_schedule, pair_needs_mask

    def count(w: int, docs) -> tuple[int, int]:
        pairs = masked = 0
        for (qs, qe), inner in chunk_schedule(tokens, tokens, chunk_size, True, window=w, documents=docs):
            pairs += len(inner)
            masked += sum(pair_needs_mask(qs, qe, ks, ke, True, w, docs) for ks, ke in inner)
        return pairs, masked

    opts = method_options(method, tokens, window, documents)
    pairs, masked = count(opts["window"], Documents.of(opts["segment_ids"], chunk_size))
    causal_pairs, _ = count(0, None)
    return {"pairs": pairs, "masked_pairs": masked, "causal_pairs": causal_pairs}


# ------------------------------------------------------------------------------ worker
def mask_step(*, method: str, tokens: int, heads: int, kv_heads: int, head_dim: int, chunk_size: int, window: int,
              documents: int, repeats: int, step_limit_s: float, seed: int) -> dict[str, Any]:
    """The attention core with ``method``'s mask: forward, ``out.sum()``, backward."""
    import torch

    from longctx_compiler.kernels.attention import chunked_attention
    from longctx_compiler.memory import measure_step

    opts = method_options(method, tokens, window, documents)
    gen = torch.Generator().manual_seed(seed)
    q0, k0, v0 = (torch.randn(1, h, tokens, head_dim, generator=gen).requires_grad_() for h in (heads, kv_heads, kv_heads))

    def step():
        # Non-leaf inputs that nothing but the op keeps (like projections in a model): what
        # autograd saves is what the op saved.
        out = chunked_attention(q0.clone(), k0.clone(), v0.clone(), causal=True, chunk_size=chunk_size,
                                window=opts["window"], segment_ids=opts["segment_ids"])
        out.sum().backward()

    def zero():
        for t in (q0, k0, v0):
            t.grad = None
        gc.collect()

    out: dict[str, Any] = {"method": method, "tokens": tokens}
    t0 = time.perf_counter()
    step()
    out["warmup_s"] = time.perf_counter() - t0
    report_progress(out)
    if out["warmup_s"] > step_limit_s:
        raise StepTimeout(f"the warm-up step took {out['warmup_s']:.1f} s > limit {step_limit_s:.0f} s")

    zero()
    t0 = time.perf_counter()
    mem = measure_step(step, device="cpu")
    out["profiled_step_s"] = time.perf_counter() - t0
    out.update(peak_bytes=mem.peak_bytes, saved_bytes=mem.saved_for_backward_bytes, saved_param_bytes=mem.saved_param_bytes)
    report_progress(out)

    timing = time_steps(step, repeats=repeats, before_each=zero, limit_s=step_limit_s)
    out["step_s"] = timing["median_s"]
    out["step_times_s"] = timing["times_s"]
    return out


# ------------------------------------------------------------------------------ sweep
def _sweep(args, methods: tuple[str, ...]) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    dead: dict[str, str] = {}
    base_kwargs = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, chunk_size=args.chunk_size,
                       window=args.window, documents=args.documents, repeats=args.repeats, step_limit_s=args.step_limit,
                       seed=args.seed)
    timeout = args.timeout or args.step_limit * (args.repeats + 3) + 120
    for tokens in args.tokens:
        for method in methods:
            rec: dict[str, Any] = {"method": method, "tokens": tokens}
            rec.update(schedule_counts(method, tokens, args.chunk_size, args.window, args.documents))
            rec["pair_fraction"] = ratio(rec["pairs"], rec["causal_pairs"])
            if method in dead:
                rec.update(status=TIMEOUT, timeout_kind="after_smaller_T", error=dead[method])
            else:
                res = run_isolated("benchmarks.bench_masks", "mask_step", dict(base_kwargs, method=method, tokens=tokens),
                                   timeout_s=timeout)
                # A finished run's progress repeats its result: kept only for runs that failed.
                rec.update({k: v for k, v in res.items() if k != "result" and not (k == "progress" and res["status"] == OK)})
                partial = res.get("result") or res.get("progress") or {}
                rec.update({k: v for k, v in partial.items() if k not in rec or k in ("method", "tokens")})
                if res["status"] in (TIMEOUT, OOM):
                    dead[method] = f"{token_label(tokens)} ended with {res['status']}"
            records.append(rec)
            _print_progress(rec)
    _add_ratios(records)
    return records


def _print_progress(rec: dict[str, Any]) -> None:
    line = f"T={token_label(rec['tokens']):>5s} {rec['method']:9s} {rec['status']:8s} pairs {rec['pairs']:>5d}/{rec['causal_pairs']:<5d}"
    if "saved_bytes" in rec:
        line += f" peak {fmt_bytes(rec['peak_bytes']):>10s} saved {fmt_bytes(rec['saved_bytes']):>10s}"
    if rec.get("step_s") is not None:
        line += f" step {rec['step_s']:.3f} s"
    if rec["status"] != OK and rec.get("error"):
        line += f"  ({rec['error']})"
    print(line, flush=True)


def _add_ratios(records: list[dict[str, Any]]) -> None:
    base = {r["tokens"]: r for r in records if r["method"] == BASELINE and r["status"] == OK}
    for r in records:
        b = base.get(r["tokens"])
        if b is None or r["status"] != OK:
            continue
        r["vs_" + BASELINE] = {
            "time": ratio(r.get("step_s"), b.get("step_s")),
            "saved": ratio(r.get("saved_bytes"), b.get("saved_bytes")),
            "peak": ratio(r.get("peak_bytes"), b.get("peak_bytes")),
            "pairs": ratio(r["pairs"], b["pairs"]),
        }


# ------------------------------------------------------------------------------ targets
def check_targets(records: list[dict[str, Any]], args) -> list[dict[str, Any]]:
    """The two targets, at the largest T where the baseline and the method both ran. Never asserted."""
    ok = {(r["method"], r["tokens"]): r for r in records if r["status"] == OK}
    stated = (args.window == STATED["window"] and args.documents == STATED["documents"]
              and args.chunk_size == STATED["chunk_size"])

    def judged_at(method: str) -> int | None:
        ts = [t for (m, t) in ok if m == method and (BASELINE, t) in ok]
        return max(ts) if ts else None

    targets = []
    t1: dict[str, Any] = {"name": f"window: step time <= {WINDOW_TIME_TARGET}x causal's and saved-for-backward bytes "
                                  f"equal to causal's (window {args.window})"}
    T = judged_at("window")
    if T is None:
        t1.update(result="NOT MEASURED", summary="no T with both causal and window measured")
    else:
        w, c = ok["window", T], ok[BASELINE, T]
        time_ratio = ratio(w["step_s"], c["step_s"])
        same_saved = w["saved_bytes"] == c["saved_bytes"]
        passed = time_ratio is not None and time_ratio <= WINDOW_TIME_TARGET and same_saved
        t1.update(result="PASS" if passed else "FAIL", tokens=T, at_stated_size=stated and T == STATED["tokens"],
                  time_ratio=time_ratio, time_pass=time_ratio is not None and time_ratio <= WINDOW_TIME_TARGET,
                  saved_bytes_window=w["saved_bytes"], saved_bytes_causal=c["saved_bytes"], saved_equal=same_saved,
                  pair_fraction=w["pair_fraction"],
                  summary=f"T={token_label(T)}, window {args.window}: step {w['step_s']:.3g} s vs causal {c['step_s']:.3g} s "
                          f"= {time_ratio:.3f}x (target <= {WINDOW_TIME_TARGET}); computes {w['pairs']}/{c['pairs']} "
                          f"= {w['pair_fraction']:.3f} of causal's chunk pairs; saved {fmt_bytes(w['saved_bytes'])} vs "
                          f"{fmt_bytes(c['saved_bytes'])} ({'equal' if same_saved else 'DIFFERENT'})")
    targets.append(t1)

    t2: dict[str, Any] = {"name": f"documents: step time <= {DOCUMENTS_TIME_TARGET}x one causal document's "
                                  f"({args.documents} packed documents)"}
    T = judged_at("documents")
    if T is None:
        t2.update(result="NOT MEASURED", summary="no T with both causal and documents measured")
    else:
        d, c = ok["documents", T], ok[BASELINE, T]
        time_ratio = ratio(d["step_s"], c["step_s"])
        passed = time_ratio is not None and time_ratio <= DOCUMENTS_TIME_TARGET
        t2.update(result="PASS" if passed else "FAIL", tokens=T, at_stated_size=stated and T == STATED["tokens"],
                  time_ratio=time_ratio, pair_fraction=d["pair_fraction"],
                  summary=f"T={token_label(T)}, {args.documents} documents of {T // args.documents} tokens: step "
                          f"{d['step_s']:.3g} s vs causal {c['step_s']:.3g} s = {time_ratio:.3f}x (target <= "
                          f"{DOCUMENTS_TIME_TARGET}); computes {d['pairs']}/{c['pairs']} = {d['pair_fraction']:.3f} of "
                          f"causal's chunk pairs ({d['masked_pairs']} masked)")
    targets.append(t2)
    return targets


# ------------------------------------------------------------------------------ output
def plot(doc: dict[str, Any], path: Path) -> Path:
    runs, cfg = doc["records"], doc["config"]
    fig, axes = new_figure(1, 2)

    def series(key):
        return {m: [(r["tokens"], r.get(key)) for r in runs if r["method"] == m and r["status"] == OK] for m in METHODS}

    plot_series(axes[0][0], series("step_s"), xlabel="T (tokens)", ylabel="seconds",
                title=f"attention fwd+bwd step time (chunk {cfg['chunk_size']}, window {cfg['window']}, "
                      f"{cfg['documents']} docs)")
    rel = {f"{m} time": [(r["tokens"], r.get("vs_causal", {}).get("time")) for r in runs if r["method"] == m]
           for m in METHODS if m != BASELINE}
    rel.update({f"{m} pairs": [(r["tokens"], r.get("pair_fraction")) for r in runs if r["method"] == m]
                for m in METHODS if m != BASELINE})
    # One colour per method (as in the left panel): its time solid, its pairs dashed.
    styles = {f"{m} {kind}": {"color": f"C{i}", **({"linestyle": "--"} if kind == "pairs" else {})}
              for i, m in enumerate(METHODS) for kind in ("time", "pairs")}
    plot_series(axes[0][1], rel, xlabel="T (tokens)", ylabel="fraction of causal", styles=styles,
                title="vs causal: step time (solid), chunk pairs computed (dashed)")
    failed = [f"{r['method']}@{token_label(r['tokens'])}:{r['status']}" for r in runs if r["status"] != OK]
    if failed:
        fig.text(0.01, 0.005, "not measured: " + ", ".join(failed), fontsize=6, wrap=True)
    fig.suptitle(f"longctx masks benchmark — {doc['environment'].get('device')}, torch {doc['environment'].get('torch')}",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _table(records: list[dict[str, Any]]) -> str:
    f = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
    lines = [f"{'T':>5s} {'method':9s} {'status':8s} {'pairs':>11s} {'pair frac':>9s} {'masked':>6s} {'peak':>10s} "
             f"{'saved':>10s} {'step s':>7s} {'time/causal':>11s}"]
    for r in records:
        v = r.get("vs_" + BASELINE, {})
        lines.append(f"{token_label(r['tokens']):>5s} {r['method']:9s} {r['status']:8s} "
                     f"{str(r['pairs']) + '/' + str(r['causal_pairs']):>11s} {f(r['pair_fraction']):>9s} "
                     f"{r['masked_pairs']:>6d} {fmt_bytes(r.get('peak_bytes')):>10s} {fmt_bytes(r.get('saved_bytes')):>10s} "
                     f"{f(r.get('step_s')):>7s} {f(v.get('time')):>11s}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run masks", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", nargs="+", default=["32K"], help="sequence lengths (32K = 32768); the targets are judged at the largest")
    p.add_argument("--window", type=int, default=STATED["window"], help="sliding window of the window method")
    p.add_argument("--documents", type=int, default=STATED["documents"], help="packed documents per row (T / N tokens each)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--chunk-size", type=int, default=STATED["chunk_size"])
    p.add_argument("--repeats", type=int, default=3, help="timed steps per run (median), after one warm-up and one measured step")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="causal always runs (the baseline)")
    p.add_argument("--step-limit", type=float, default=300.0, help="seconds one step may take; a slower run stops there")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock limit per run (default from --step-limit and --repeats)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "masks_cpu.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.tokens = sorted(set(parse_tokens(args.tokens)))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.window < 1 or args.documents < 1 or args.chunk_size < 1:
        p.error("--window, --documents and --chunk-size must be >= 1")
    if any(t < args.documents for t in args.tokens):
        p.error("every --tokens value must hold at least one token per document")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    methods = tuple(m for m in METHODS if m in args.methods or m == BASELINE)
    start = time.perf_counter()
    records = _sweep(args, methods)
    targets = check_targets(records, args)
    doc = {
        "benchmark": "masks",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "units": {"bytes": "bytes", "time": "seconds"},
        "notes": [
            "Attention core only: chunked_attention(q, k, v, causal=True, chunk_size=C, window=, segment_ids=), "
            "loss out.sum(), backward; float32, batch 1, q [1, H, T, Dh], k/v [1, Hkv, T, Dh].",
            "step_s: median of --repeats timed steps after one warm-up step and one step under measure_step.",
            "saved_bytes: distinct non-parameter storages autograd packed for backward (measure_step); documents also "
            "saves its [1, T] int64 ids. peak_bytes: CPU high-water mark of one step above its start.",
            "pairs: chunk pairs the op's schedule computes (chunk_schedule with window=/documents=); pair_fraction: "
            "pairs / causal's; masked_pairs: those of them with a mask (pair_needs_mask).",
            "On CPU ATen's flash kernel computes every pair the band or the documents do not cut; masked pairs (the "
            "band's edge, pairs holding several documents) run the generic torch pair. Time ratios are read against "
            "pair_fraction with that in mind. Step times on a shared CPU are relative figures only.",
        ],
        "baseline": BASELINE,
        "stated_size": STATED,
        "records": records,
        "targets": targets,
        "sweep_wall_s": round(time.perf_counter() - start, 1),
        "environment": env_metadata(),
    }
    path = write_results(args.out, doc)
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(doc, args.plot or Path(args.out).with_suffix('.png'))}")
    print("\nattention core, fwd + bwd, vs causal:\n" + _table(records))
    print()
    for t in targets:
        print(f"{t['result']}: {t['name']}\n    {t['summary']}")
    print(f"\nsweep took {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
