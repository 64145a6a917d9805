"""Mamba-2 SSD scans: one training step's memory and time across sequence lengths, transformers'
torch path against the captured, adjoint-sharded SSD op (ours), side by side in one run.

One training step (forward, loss, backward) of a small ``transformers.Mamba2ForCausalLM``
(random weights, float32, batch 1) per configuration, each in its own subprocess
(:func:`benchmarks.common.run_isolated`) under a wall-clock limit. Methods:

``eager``  the transformers torch path: ``mamba2_chunk_scan``'s chunk form, which keeps for
           backward the ``[B, H, C, Q, Q]`` decay and score matrices, the per-chunk states and
           the float32 copies of x, B and C (B and C repeated to every head);
``ours``   ``longctx_compiler.optimize(model, backend=B)``: the scan captured as one
           ``longctx::ssd_fwd`` per layer, planned with the model's ``chunk_size`` (the report
           is recorded: ``ssd_rewrites``), saving the inputs and the ``⌈T/Q⌉`` chunk-boundary
           states only. The Mamba-2 block around it (in_proj, convolution, gated RMSNorm,
           out_proj) is not chunked along the sequence here: its activations are saved as
           plain autograd saves them.

Memory meter and the checks are the selective-scan benchmark's (``benchmarks/bench_ssm.py``):
the exact allocation meter of :mod:`benchmarks.alloc_meter` (``--meter auto``: RSS without a
C compiler), the steady-state (second) step's peak above the level when it began. Checks
(printed PASS/FAIL and stored under ``targets``; never asserted):

* at ``--target-tokens`` (default 2K): peak ratio ``eager / ours >= 10`` and step time
  ``ours <= eager``;
* ours completes a step at 64K;
* ours' peak is not O(T·D·N): the least-squares slope of ours' peak over T, in units of one
  ``[T, D_inner]`` float32 activation (``4·D_inner`` bytes per token), must stay below
  ``layers · N`` such units (every layer keeping a ``[T, D_inner, N]`` float32 state).

The JSON also records what the block keeps per token (``block_activation_units``: the slope
of ours in ``[T, D_inner]`` float32 units) so that a missed 10x can be read as "the block's
other activations dominate" with the figure.

Run: ``python -m benchmarks.run ssd --help``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import time
from typing import Any

from benchmarks.bench_ssm import _meter, _slope
from benchmarks.common import (
    OK, OOM, RESULTS_DIR, SKIPPED, TIMEOUT, env_metadata, fmt_bytes, new_figure, parse_tokens, plot_series, ratio,
    report_progress, run_isolated, token_label, write_results, StepTimeout,
)

METHODS = ("eager", "ours")
TARGET_T = 2048

logger = logging.getLogger("longctx_compiler.benchmarks")


def ssd_step(*, method: str, tokens: int, layers: int, hidden: int, state: int, head_dim: int, groups: int, vocab: int,
             chunk_size: int, warmup_tokens: int, step_limit_s: float, seed: int, meter: str = "alloc",
             backend: str = "aot_eager") -> dict[str, Any]:
    """One Mamba2ForCausalLM training step with ``method``: peak memory over the step, step time."""
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch
    import transformers

    import longctx_compiler as lc

    if meter == "alloc":
        from benchmarks.alloc_meter import library

        library()  # fail now, with the reason, if the shim is not preloaded
    torch.manual_seed(seed)
    d_inner = 2 * hidden
    cfg = transformers.Mamba2Config(hidden_size=hidden, state_size=state, num_heads=d_inner // head_dim, head_dim=head_dim,
                                    n_groups=groups, expand=2, num_hidden_layers=layers, vocab_size=vocab, chunk_size=chunk_size)
    model = transformers.Mamba2ForCausalLM(cfg).float().train()
    if method == "ours":
        run = lc.optimize(model, backend=backend)
    elif method == "eager":
        run = model
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)

    def step(x):
        run(x, labels=x, use_cache=False).loss.backward()

    def zero():
        model.zero_grad(set_to_none=True)
        gc.collect()

    out: dict[str, Any] = {"method": method, "tokens": tokens, "meter": meter, "d_inner": d_inner, "heads": cfg.num_heads}
    # Ours compiles one graph for every T (dynamic sequence dim): warm up short.
    t0 = time.perf_counter()
    step(ids[:, : min(warmup_tokens, tokens)])
    out["warmup_s"] = time.perf_counter() - t0
    if method == "ours":
        out["compile_s"] = out["warmup_s"]
        out["ssd_rewrites"] = run.report.count("ssd_scan")
        out["compile_count_after_warmup"] = run.compile_count
    report_progress(out)

    def measured() -> tuple[float, int]:
        zero()
        with _meter(meter) as mem:
            t0 = time.perf_counter()
            step(ids)
            took = time.perf_counter() - t0
        if meter == "alloc":
            out["retained_bytes"] = mem.end_bytes
        return took, mem.peak_bytes

    # Two measured steps: the first at a new length also pays one-time costs (math-library
    # scratch grown to the new largest shape); the second is the step a training run repeats.
    first, out["peak_bytes_first_step"] = measured()
    report_progress(out)
    if first > step_limit_s:
        out["step_s"] = first
        report_progress(out)
        raise StepTimeout(f"the measured step took {first:.1f} s > limit {step_limit_s:.0f} s")
    second, out["peak_bytes"] = measured()
    out["step_s"] = min(first, second)
    out["step_times_s"] = [first, second]
    if method == "ours":
        out["compile_count"] = run.compile_count
    return out


def _targets(records: list[dict[str, Any]], cfg: dict[str, Any], target_t: int) -> dict[str, Any]:
    by = {(r["method"], r["tokens"]): r for r in records}
    label = token_label(target_t)
    eager, ours = by.get(("eager", target_t), {}), by.get(("ours", target_t), {})
    mem = ratio(eager.get("peak_bytes"), ours.get("peak_bytes"))
    took = ratio(ours.get("step_s"), eager.get("step_s"))
    out: dict[str, Any] = {
        f"{label}_memory_10x_less_than_eager": {
            "pass": mem is not None and mem >= 10, "target": "eager peak / ours peak >= 10", "eager_over_ours": mem,
            "eager_peak_bytes": eager.get("peak_bytes"), "ours_peak_bytes": ours.get("peak_bytes"),
            "summary": (f"eager/ours peak = {mem:.2f} ({fmt_bytes(eager.get('peak_bytes'))} / {fmt_bytes(ours.get('peak_bytes'))}), need >= 10"
                        if mem is not None else f"not measured (eager: {eager.get('status')}, ours: {ours.get('status')})"),
        },
        f"{label}_time_not_more_than_eager": {
            "pass": took is not None and took <= 1.0, "target": "ours step_s / eager step_s <= 1", "ours_over_eager": took,
            "summary": (f"ours/eager step time = {took:.3f} ({ours.get('step_s'):.3g} s / {eager.get('step_s'):.3g} s), need <= 1"
                        if took is not None else f"not measured (eager: {eager.get('status')}, ours: {ours.get('status')})"),
        },
    }
    done = sorted(r["tokens"] for r in records if r["method"] == "ours" and r["status"] == OK)
    largest = done[-1] if done else None
    out["64K_step_completes"] = {"pass": largest is not None and largest >= 65536, "largest_T_completed": largest,
                                 "step_s": by.get(("ours", largest), {}).get("step_s") if largest else None,
                                 "summary": f"largest T ours completed: {token_label(largest) if largest else None}"}
    s = _slope(records, "ours", cfg)
    if "slope_units" in s:
        margin = s.get("below_bound_by")
        summary = (f"ours' peak slope = {s['slope_units']:.2f} x 4*D_inner B/token ({s['slope_bytes_per_token']:.0f} B/token over "
                   f"T={[token_label(t) for t in s['T']]}); O(T*D*N) would be >= layers*N = {s['state_bound_units']}"
                   + (f", {margin:.1f}x below it" if margin else ""))
    else:
        summary = s["reason"]
    out["peak_not_O_TDN"] = {"pass": s.get("slope_bytes_per_token") is not None and s["slope_bytes_per_token"] < s["state_bound_bytes_per_token"],
                             **s, "summary": summary}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run ssd", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", default=["1K", "2K", "4K", "8K", "16K", "32K", "64K"])
    p.add_argument("--eager-max-tokens", default="8K", help="largest T for eager (its peak is linear in T; ratios are at 2K)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64, help="d_model; D_inner = 2 * hidden")
    p.add_argument("--state", type=int, default=64, help="SSM state size N")
    p.add_argument("--head-dim", type=int, default=16, help="P; heads H = D_inner / P")
    p.add_argument("--groups", type=int, default=1, help="B/C groups G")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=256, help="the model's chunk_size (Mamba2Config's default)")
    p.add_argument("--backend", default="aot_eager", choices=("inductor", "aot_eager"), help="ours: compiler backend")
    p.add_argument("--warmup-tokens", type=int, default=512)
    p.add_argument("--target-tokens", default=token_label(TARGET_T))
    p.add_argument("--meter", default="auto", choices=("auto", "alloc", "rss"))
    p.add_argument("--timeout", type=float, default=600.0, help="wall-clock limit of one configuration (s)")
    p.add_argument("--step-limit", type=float, default=240.0, help="give up a method once a step takes longer (s)")
    p.add_argument("--out", default=str(RESULTS_DIR / "ssd_cpu.json"), help="result JSON (the plot goes next to it, .png)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokens = sorted(parse_tokens(args.tokens))
    (target_t,) = parse_tokens([args.target_tokens])
    (eager_max,) = parse_tokens([args.eager_max_tokens])

    meter, env, meter_note = args.meter, {}, None
    if meter in ("auto", "alloc"):
        from benchmarks import alloc_meter

        try:
            env, meter = alloc_meter.child_env(), "alloc"
        except alloc_meter.MeterUnavailable as e:
            if meter == "alloc":
                p.error(str(e))
            meter, meter_note = "rss", f"allocation meter unavailable, fell back to RSS: {e}"
            print(f"WARNING: {meter_note}", flush=True)
    if meter == "rss":
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cfg = {"layers": args.layers, "hidden": args.hidden, "state": args.state, "head_dim": args.head_dim, "groups": args.groups,
           "vocab": args.vocab, "chunk_size": args.chunk_size}
    config = {**cfg, "backend": args.backend, "warmup_tokens": args.warmup_tokens, "tokens": tokens, "eager_max_tokens": eager_max,
              "methods": args.methods, "target_tokens": target_t, "timeout_s": args.timeout, "step_limit_s": args.step_limit,
              "meter": meter, **({"meter_note": meter_note} if meter_note else {})}
    records: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    print(f"meter: {meter}", flush=True)
    print(f"{'T':>5s} {'method':8s} {'status':8s} {'peak':>10s} {'step_s':>8s}", flush=True)
    t_start = time.perf_counter()
    for t in tokens:
        for method in args.methods:
            if method == "eager" and t > eager_max:
                continue
            if method in stopped:
                rec = {"method": method, "tokens": t, "status": SKIPPED, "reason": f"{stopped[method]} at a smaller T"}
            else:
                res = run_isolated("benchmarks.bench_ssd", "ssd_step", dict(method=method, tokens=t, warmup_tokens=args.warmup_tokens,
                                   step_limit_s=args.step_limit, seed=0, meter=meter, backend=args.backend, **cfg),
                                   timeout_s=args.timeout, env=env)
                rec = {"method": method, "tokens": t, "status": res["status"], "wall_s": res.get("wall_s"),
                       "load_avg_1m_after": res.get("load_avg_1m_after")}
                rec.update({k: v for k, v in (res.get("result") or res.get("progress") or {}).items() if k not in ("method", "tokens")})
                if res["status"] != OK:
                    rec["error"] = (res.get("error") or "") + "\n" + (res.get("output_tail") or "")[-800:]
                    if res["status"] in (TIMEOUT, OOM):
                        stopped[method] = res["status"]
            records.append(rec)
            step_s = rec.get("step_s")
            print(f"{token_label(t):>5s} {method:8s} {rec['status']:8s} {fmt_bytes(rec.get('peak_bytes')):>10s} "
                  f"{'-' if step_s is None else f'{step_s:.2f}':>8s}", flush=True)
    targets = _targets(records, cfg, target_t)
    print("\ntargets:")
    for name, v in targets.items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {name}: {v['summary']}")
    eager_slope = _slope(records, "eager", cfg)
    write_results(args.out, {
        "benchmark": "ssd", "config": config, "records": records, "targets": targets,
        "comparisons": {"eager_slope": eager_slope}, "sweep_wall_s": round(time.perf_counter() - t_start, 1),
        "notes": [
            "peak_bytes: the second of two measured steps at T (steady state), above the level when the step began; "
            "meter as in benchmarks/bench_ssm.py.",
            "step_s: the faster of the two measured steps; compile_s: ours' first call (compile included) at --warmup-tokens.",
            "peak_not_O_TDN: least-squares slope of ours' peak over T, in units of 4*D_inner bytes per token, against "
            "layers*N such units (every layer keeping [T, D_inner, N] float32 states).",
            "Step times on a shared CPU are relative figures only.",
        ],
        "environment": env_metadata(),
    })
    fig, axes = new_figure(1, 2)
    for ax, key, unit in ((axes[0][0], "peak_bytes", "bytes"), (axes[0][1], "step_s", "seconds")):
        series = {m: [(r["tokens"], r.get(key) if r["status"] == OK else None) for r in records if r["method"] == m] for m in args.methods}
        plot_series(ax, series, title=f"Mamba-2 step: {'peak allocated' if key == 'peak_bytes' else 'time (CPU, relative)'} "
                    f"({args.layers} layers, d={args.hidden}, N={args.state})", xlabel="T (tokens)", ylabel=unit)
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
