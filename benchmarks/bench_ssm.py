"""SSM scan memory and step time across sequence lengths: transformers' torch path,
plain ``torch.compile`` and adjoint-sharded scans (ours), side by side in one run.

One training step (forward, loss, backward) of a small ``transformers.MambaForCausalLM``
(random weights, float32, batch 1) per configuration, each in its own subprocess
(:func:`benchmarks.common.run_isolated`) under a wall-clock limit. Methods:

``eager``          the transformers torch path: ``mamba_selective_scan``'s sequential loop.
                   Eager transformers runs that loop whatever ``use_associative_scan`` says,
                   so one eager method covers both scan modes: the associative branch of
                   ``transformers/models/mamba/modeling_mamba.py`` (``mamba_selective_scan``,
                   transformers 5.23) is guarded by
                   ``and (is_torchdynamo_compiling() and not is_torchdynamo_exporting())``,
                   i.e. taken only while Dynamo traces. The run re-checks that guard in the
                   installed source and records it (``config.eager_ignores_use_associative_scan``);
``compile_assoc``  plain ``torch.compile`` (Inductor) with ``use_associative_scan=True``
                   (the "generic" associative scan, unrolled into a log-depth tree);
``compile_loop``   plain ``torch.compile`` with ``use_associative_scan=False`` (the loop,
                   unrolled over T: compile time grows with T);
``ours``           ``longctx_compiler.optimize(model, backend=B, ssm={"chunk_size": Q})``
                   (Inductor by default): the scan captured as one canonical node per layer,
                   adjoint-sharded, and each Mamba block run chunk by chunk along the
                   sequence (``ssm.block_chunk_size``).

``--device cuda`` runs the same on a GPU (e.g. ``--layers 24 --hidden 768 --vocab 50280``,
mamba-130m's shape) with the CUDA caching allocator's peak as the meter (``--meter cuda``).

**Memory meter** (the same for every method, recorded as ``config.meter``): ``alloc`` — the
exact allocation meter of :mod:`benchmarks.alloc_meter`, an ``LD_PRELOAD`` shim that counts
the bytes of live heap blocks of >= 1 KiB (tensor storage: PyTorch's CPU allocator uses
``posix_memalign``) in every thread; ``peak_bytes`` is its high-water mark during the step
above its level when the step began. Not RSS (page-granular, counts memory the C allocator
keeps after a free, sampled rather than exact), and not the profiler-based
:func:`longctx_compiler.memory.measure_step` (exact, but it records one event per op and
allocation: on the eager loop's ~270K ops per step at T = 1K it grows the process to
~17 GB). Against ``measure_step`` the meter agrees to a few KiB on compiled steps; on eager
steps it reads ~25 B per autograd node more (the autograd engine's per-backward bookkeeping:
dependency map, visited set and queue over the graph's nodes, heap arrays the profiler does
not see; see ``benchmarks/README.md``). Without a C compiler ``--meter auto`` falls back to
``rss`` (resident-set high-water mark sampled every millisecond), said in the output and JSON.

A method is not run at larger T after it timed out or ran out of memory at a smaller one
(recorded as ``skipped``). Step times on a shared CPU are relative figures only.

**Checks** (printed PASS/FAIL and stored under ``targets``; never asserted):

* at ``--target-tokens`` (default 2K): peak ratio ``eager / ours >= 10`` and step time
  ``ours <= eager`` (eager being one method for both scan modes, see above);
* ours completes a step at 64K;
* ours' peak is not O(T·D·N): least-squares fit ``peak(T) = a + b·T`` over ours' completed
  lengths. A method that keeps the per-step scan states ``[T, D_inner, N]`` (float32) of every
  layer — what the eager loop does — has a per-token slope of at least
  ``layers · 4·D_inner·N`` bytes. Ours keeps O(T·D) activations and O(T/Q·D·N) boundary
  states, i.e. a slope of some number ``k`` of ``[T, D_inner]`` float32 activations
  (``4·D_inner`` bytes per token each) plus ``layers · 4·D_inner·N / Q``. The check reports
  ``b`` in units of ``4·D_inner`` bytes ("activations of width D_inner held per token") and
  passes when ``b < layers · N`` such units, with the margin. At one N it cannot tell a large
  O(T·D) constant from O(T·D·N) — running again with a larger ``--state`` can: ours' slope
  should not move with N. Eager's slope is reported in the same units as a reference.

Run: ``python -m benchmarks.run ssm --help``.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import logging
import os
import threading
import time
from typing import Any

from benchmarks.common import (
    OK, OOM, RESULTS_DIR, SKIPPED, TIMEOUT, StepTimeout, env_metadata, fmt_bytes, new_figure, parse_tokens, plot_series,
    ratio, report_progress, run_isolated, token_label, write_results,
)

METHODS = ("eager", "compile_assoc", "compile_loop", "ours")
#: The transformers torch path(s) the targets compare against (eager ignores use_associative_scan).
EAGER_METHODS = ("eager",)
#: Targets of the issue: memory and time at this length (``--target-tokens``).
TARGET_T = 2048
METERS = ("auto", "alloc", "rss", "cuda")

logger = logging.getLogger("longctx_compiler.benchmarks")


class _RssSampler:
    """Fallback meter (``--meter rss``): peak resident bytes, sampled from /proc/self/statm."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s = period_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self.peak_bytes: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.period_s)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.peak_bytes = self.peak - self.start


class _CudaPeak:
    """CUDA meter (``--device cuda``): the caching allocator's peak above the level at entry."""

    def __enter__(self) -> "_CudaPeak":
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak_bytes = torch.cuda.max_memory_allocated() - self.start
        self.end_bytes = torch.cuda.memory_allocated() - self.start


def _meter(kind: str):
    if kind == "cuda":
        return _CudaPeak()
    if kind == "alloc":
        from benchmarks.alloc_meter import AllocPeak

        return AllocPeak()
    if kind == "rss":
        return _RssSampler()
    raise ValueError(f"unknown meter {kind!r}")


def eager_ignores_assoc_flag() -> bool:
    """Whether the installed transformers takes the associative-scan branch only under Dynamo
    (so eager runs the sequential loop in both ``use_associative_scan`` settings)."""
    from transformers.models.mamba import modeling_mamba

    src = inspect.getsource(modeling_mamba.mamba_selective_scan)
    return "use_associative_scan" in src and "is_torchdynamo_compiling()" in src


def ssm_step(*, method: str, tokens: int, layers: int, hidden: int, state: int, vocab: int, chunk_size: int,
             warmup_tokens: int, step_limit_s: float, seed: int, meter: str = "alloc",
             backend: str = "inductor", device: str = "cpu") -> dict[str, Any]:
    """One MambaForCausalLM training step with ``method``: peak memory over the step, step time."""
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
    cfg = transformers.MambaConfig(hidden_size=hidden, state_size=state, num_hidden_layers=layers, vocab_size=vocab,
                                   use_associative_scan=method != "compile_loop")
    model = transformers.MambaForCausalLM(cfg).float().train().to(device)
    if method == "ours":
        run = lc.optimize(model, backend=backend, ssm={"chunk_size": chunk_size})
    elif method in ("compile_assoc", "compile_loop"):
        run = torch.compile(model, backend="inductor")
    elif method == "eager":
        run = model
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen).to(device)

    def step(x):
        run(x, labels=x).loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    def zero():
        model.zero_grad(set_to_none=True)
        gc.collect()

    out: dict[str, Any] = {"method": method, "tokens": tokens, "meter": meter, "d_inner": cfg.intermediate_size}
    # Ours compiles one graph for every T (dynamic sequence dim): warm up short. Plain
    # torch.compile specialises on T here (the unrolled loop / scan tree depend on it), so
    # its warm-up is at T itself and is its compile time.
    warm = ids if method.startswith("compile") else ids[:, : min(warmup_tokens, tokens)]
    t0 = time.perf_counter()
    step(warm)
    out["warmup_s"] = time.perf_counter() - t0
    if method != "eager":
        out["compile_s"] = out["warmup_s"]
    if method == "ours":
        out["scan_rewrites"] = run.report.count("adjoint_sharded_scan")
        out["compile_count_after_warmup"] = run.compile_count
    report_progress(out)

    def measured() -> tuple[float, int]:
        zero()
        with _meter(meter) as mem:
            t0 = time.perf_counter()
            step(ids)
            took = time.perf_counter() - t0
        if meter in ("alloc", "cuda"):
            out["retained_bytes"] = mem.end_bytes  # still allocated after the step: gradients, uncollected garbage
        return took, mem.peak_bytes

    # Two measured steps at T. The first at a new length also pays one-time costs that every
    # method pays alike and later steps do not: math libraries growing their per-thread
    # matmul scratch to the largest shape seen (about 4 MiB at 2K here, retained for good,
    # eager included), and any compilation. The second is the step a training run repeats;
    # its peak is the reported one, the first is kept as peak_bytes_first_step.
    first, out["peak_bytes_first_step"] = measured()
    report_progress(out)
    if first > step_limit_s:
        out["step_s"] = first
        report_progress(out)
        raise StepTimeout(f"the measured step took {first:.1f} s > limit {step_limit_s:.0f} s")
    if method == "ours":
        out["recompiled_at_T"] = run.compile_count != out["compile_count_after_warmup"]
    second, out["peak_bytes"] = measured()
    out["step_s"] = min(first, second)
    out["step_times_s"] = [first, second]
    if method == "ours":
        out["compile_count"] = run.compile_count
    return out


def _line(rec: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{token_label(rec['tokens']):>5s} {rec['method']:14s} {rec['status']:8s} {fmt_bytes(rec.get('peak_bytes')):>10s} "
            f"{f(rec.get('step_s')):>8s} {f(rec.get('compile_s')):>8s}")


def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares ``(a, b)`` of ``y = a + b·x`` over at least two points with distinct x."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if n < 2 or sxx == 0:
        raise ValueError("a line needs two distinct x values")
    b = sum((x - mx) * (y - my) for x, y in points) / sxx
    return my - b * mx, b


def _slope(records: list[dict[str, Any]], method: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-token slope of ``method``'s peak in units of one [T, D_inner] float32 activation."""
    ok = [r for r in records if r["method"] == method and r["status"] == OK and r.get("peak_bytes") is not None]
    pts = sorted((r["tokens"], r["peak_bytes"]) for r in ok)
    d_inner = next((r["d_inner"] for r in ok if r.get("d_inner")), 2 * cfg["hidden"])
    unit = 4 * d_inner
    bound_units = cfg["layers"] * cfg["state"]
    out: dict[str, Any] = {"method": method, "T": [t for t, _ in pts], "unit_bytes_per_token": unit, "d_inner": d_inner,
                           "state_bound_units": bound_units, "state_bound_bytes_per_token": bound_units * unit}
    if len({t for t, _ in pts}) < 2:
        out["reason"] = "fewer than two completed lengths"
        return out
    a, b = fit_line(pts)
    worst = max(abs(p - (a + b * t)) / max(p, 1) for t, p in pts)
    out.update({"intercept_bytes": a, "slope_bytes_per_token": b, "slope_units": b / unit,
                "below_bound_by": (bound_units * unit) / b if b > 0 else None,
                "max_rel_deviation_from_fit": worst})
    return out


def _targets(records: list[dict[str, Any]], cfg: dict[str, Any], target_t: int,
             eager_covers_both_modes: bool | None) -> dict[str, Any]:
    by = {(r["method"], r["tokens"]): r for r in records}
    label = token_label(target_t)
    out: dict[str, Any] = {}
    ours = by.get(("ours", target_t), {})
    covers = ("use_associative_scan=True and False (eager runs the loop in both)" if eager_covers_both_modes
              else "use_associative_scan=True (config default)")
    for base in EAGER_METHODS:
        b = by.get((base, target_t), {})
        mem_ratio = ratio(b.get("peak_bytes"), ours.get("peak_bytes"))
        time_ratio = ratio(ours.get("step_s"), b.get("step_s"))
        common = {"T": target_t, "baseline": base, "scan_modes": covers, "baseline_status": b.get("status"),
                  "ours_status": ours.get("status")}
        out[f"{label}_memory_10x_less_than_{base}"] = {
            "pass": mem_ratio is not None and mem_ratio >= 10, "target": "baseline peak / ours peak >= 10",
            "baseline_over_ours": mem_ratio, "baseline_peak_bytes": b.get("peak_bytes"),
            "ours_peak_bytes": ours.get("peak_bytes"), **common,
            "summary": (f"{base}/ours peak = {mem_ratio:.2f} ({fmt_bytes(b.get('peak_bytes'))} / {fmt_bytes(ours.get('peak_bytes'))}), need >= 10"
                        if mem_ratio is not None else f"not measured ({base}: {b.get('status')}, ours: {ours.get('status')})"),
        }
        out[f"{label}_time_not_more_than_{base}"] = {
            "pass": time_ratio is not None and time_ratio <= 1.0, "target": "ours step_s / baseline step_s <= 1",
            "ours_over_baseline": time_ratio, "baseline_step_s": b.get("step_s"), "ours_step_s": ours.get("step_s"), **common,
            "summary": (f"ours/{base} step time = {time_ratio:.3f} ({ours.get('step_s'):.3g} s / {b.get('step_s'):.3g} s), need <= 1"
                        if time_ratio is not None else f"not measured ({base}: {b.get('status')}, ours: {ours.get('status')})"),
        }
    done = sorted(r["tokens"] for r in records if r["method"] == "ours" and r["status"] == OK)
    largest = done[-1] if done else None
    out["64K_step_completes"] = {"pass": largest is not None and largest >= 65536, "largest_T_completed": largest,
                                 "step_s": by.get(("ours", largest), {}).get("step_s") if largest else None,
                                 "summary": f"largest T ours completed: {token_label(largest) if largest else None}"}
    s = _slope(records, "ours", cfg)
    passed = s.get("slope_bytes_per_token") is not None and s["slope_bytes_per_token"] < s["state_bound_bytes_per_token"]
    if "slope_units" in s:
        margin = s.get("below_bound_by")
        below = "" if margin is None else (f", {margin:.1f}x below it" if margin > 1 else f", {1 / margin:.2f}x above it")
        summary = (f"ours' peak slope = {s['slope_units']:.2f} x 4*D_inner B/token ({s['slope_bytes_per_token']:.0f} B/token over "
                   f"T={[token_label(t) for t in s['T']]}); O(T*D*N) would be >= layers*N = {s['state_bound_units']}{below}")
    else:
        summary = s["reason"]
    out["peak_not_O_TDN"] = {"pass": passed, **s, "summary": summary}
    return out


def _comparisons(records: list[dict[str, Any]], cfg: dict[str, Any], target_t: int) -> dict[str, Any]:
    """Informational (not targets): ours vs plain torch.compile at the target length, and eager's slope."""
    by = {(r["method"], r["tokens"]): r for r in records}
    ours = by.get(("ours", target_t), {})
    out: dict[str, Any] = {}
    for base in ("compile_assoc", "compile_loop"):
        b = by.get((base, target_t), {})
        if b:
            out[f"{token_label(target_t)}_vs_{base}"] = {"baseline_status": b.get("status"),
                                                          "baseline_over_ours_peak": ratio(b.get("peak_bytes"), ours.get("peak_bytes")),
                                                          "ours_over_baseline_time": ratio(ours.get("step_s"), b.get("step_s"))}
    out["eager_slope"] = _slope(records, "eager", cfg)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run ssm", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", default=["1K", "2K", "4K", "8K", "16K", "32K", "64K"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--state", type=int, default=16, help="SSM state size N")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=256, help="ours: scan chunk Q")
    p.add_argument("--backend", default="inductor", choices=("inductor", "aot_eager"), help="ours: compiler backend")
    p.add_argument("--warmup-tokens", type=int, default=512)
    p.add_argument("--target-tokens", default=token_label(TARGET_T), help="T of the memory/time targets (default 2K)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cuda: peak from the CUDA caching allocator (--meter is then cuda)")
    p.add_argument("--meter", default="auto", choices=METERS,
                   help="peak-memory meter: alloc (exact LD_PRELOAD allocation meter), rss (sampled resident set), "
                        "auto (alloc, or rss without a C compiler)")
    p.add_argument("--timeout", type=float, default=240.0, help="wall-clock limit of one configuration (s)")
    p.add_argument("--step-limit", type=float, default=120.0, help="give up a method once a step takes longer (s)")
    p.add_argument("--out", default=None, help="result JSON (the plot goes next to it, .png); default results/ssm_<device>.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokens = sorted(parse_tokens(args.tokens))
    (target_t,) = parse_tokens([args.target_tokens])

    args.out = args.out or str(RESULTS_DIR / f"ssm_{args.device}.json")
    meter, meter_note, env = ("cuda" if args.device == "cuda" else args.meter), None, {}
    if meter == "cuda" and args.meter not in ("auto", "cuda"):
        p.error(f"--meter {args.meter} measures host memory; with --device cuda the meter is cuda")
    if meter in ("auto", "alloc"):
        from benchmarks import alloc_meter

        try:
            env = alloc_meter.child_env()
            meter = "alloc"
        except alloc_meter.MeterUnavailable as e:
            if meter == "alloc":
                p.error(str(e))
            meter, meter_note = "rss", f"allocation meter unavailable, fell back to RSS: {e}"
            print(f"WARNING: {meter_note}", flush=True)
    if meter == "rss":
        # Freed tensors should leave the resident set: serve blocks >= 64 KiB with mmap, trim eagerly.
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    try:
        eager_both = eager_ignores_assoc_flag()
    except Exception:  # noqa: BLE001 - recorded as unknown
        eager_both = None
    if eager_both is False and "eager" in args.methods:
        print("WARNING: the installed transformers may run eager with the associative scan; "
              "`eager` here uses the config default use_associative_scan=True", flush=True)
    cfg = {"layers": args.layers, "hidden": args.hidden, "state": args.state, "vocab": args.vocab, "chunk_size": args.chunk_size}
    config = {**cfg, "device": args.device, "backend": args.backend, "warmup_tokens": args.warmup_tokens, "tokens": tokens, "methods": args.methods,
              "target_tokens": target_t, "timeout_s": args.timeout, "step_limit_s": args.step_limit, "meter": meter,
              "eager_ignores_use_associative_scan": eager_both}
    if meter_note:
        config["meter_note"] = meter_note
    records: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    print(f"meter: {meter}", flush=True)
    print(f"{'T':>5s} {'method':14s} {'status':8s} {'peak':>10s} {'step_s':>8s} {'compile':>8s}", flush=True)
    t_start = time.perf_counter()
    for t in tokens:
        for method in args.methods:
            if method in stopped:
                rec = {"method": method, "tokens": t, "status": SKIPPED, "reason": f"{stopped[method]} at a smaller T"}
            else:
                res = run_isolated("benchmarks.bench_ssm", "ssm_step", dict(method=method, tokens=t, warmup_tokens=args.warmup_tokens,
                                   step_limit_s=args.step_limit, seed=0, meter=meter, backend=args.backend, device=args.device, **cfg),
                                   timeout_s=args.timeout, env=env)
                rec = {"method": method, "tokens": t, "status": res["status"], "wall_s": res.get("wall_s")}
                rec.update({k: v for k, v in (res.get("result") or res.get("progress") or {}).items() if k not in ("method", "tokens")})
                if res["status"] != OK:
                    rec["error"] = res.get("error")
                    if res["status"] in (TIMEOUT, OOM):
                        stopped[method] = res["status"]
            records.append(rec)
            print(_line(rec), flush=True)
    targets = _targets(records, cfg, target_t, eager_both)
    comparisons = _comparisons(records, cfg, target_t)
    print("\ntargets:")
    for name, v in targets.items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {name}: {v['summary']}")
    es = comparisons["eager_slope"]
    if "slope_units" in es:
        print(f"  (reference: eager's peak slope = {es['slope_units']:.2f} x 4*D_inner B/token)")
    meter_desc = ("peak_bytes: exact allocation meter (LD_PRELOAD shim, benchmarks/alloc_meter.c): high-water mark of live heap "
                  "blocks >= 1 KiB (usable size) during one step above the level when it began; retained_bytes: level after the step "
                  "(the gradients, and anything awaiting Python's cycle collector)." if meter == "alloc" else
                  "peak_bytes: CUDA caching allocator's max_memory_allocated during one step above the level when it began."
                  if meter == "cuda" else
                  "peak_bytes: resident-set high-water mark during one step above its start (sampled 1 ms, glibc mmap threshold 64 KiB).")
    write_results(args.out, {
        "benchmark": "ssm", "config": config, "records": records, "targets": targets, "comparisons": comparisons,
        "sweep_wall_s": round(time.perf_counter() - t_start, 1),
        "notes": [
            meter_desc,
            "step_s: the faster of two steps at T after warm-up; compile_s: the first call (for plain torch.compile at T itself).",
            "eager runs transformers' sequential loop in either use_associative_scan setting (associative_scan is used only while "
            "compiling: modeling_mamba.mamba_selective_scan guards it with is_torchdynamo_compiling()), so one eager method "
            "covers both scan modes.",
            "peak_not_O_TDN: least-squares slope of ours' peak over T, in units of 4*D_inner bytes per token, against "
            "layers*N such units (every layer keeping its per-step [T, D_inner, N] float32 states).",
            "peak_bytes: the second of two measured steps at T (steady state); peak_bytes_first_step: the first, which also "
            "holds one-time costs (math-library scratch grown to the new largest shape, any recompile: recompiled_at_T).",
            "a method is skipped at larger T after it timed out or ran out of memory.",
        ],
        "environment": env_metadata(),
    })
    fig, axes = new_figure(1, 2)
    series = {m: [(r["tokens"], r.get("peak_bytes") if r["status"] == OK else None) for r in records if r["method"] == m] for m in args.methods}
    plot_series(axes[0][0], series, title=f"Mamba step: peak {'allocated' if meter == 'alloc' else 'RSS'} ({args.layers} layers, "
                f"d={args.hidden}, N={args.state})", xlabel="T (tokens)", ylabel="bytes")
    series = {m: [(r["tokens"], r.get("step_s") if r["status"] == OK else None) for r in records if r["method"] == m] for m in args.methods}
    plot_series(axes[0][1], series, title=f"Mamba step: time ({args.device.upper()}{', relative' if args.device == 'cpu' else ''})",
                xlabel="T (tokens)", ylabel="seconds")
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
