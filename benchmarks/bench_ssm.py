"""SSM scan memory and step time across sequence lengths: transformers' torch path,
plain ``torch.compile`` and adjoint-sharded scans (ours), side by side in one run.

One training step (forward, loss, backward) of a small ``transformers.MambaForCausalLM``
(random weights, float32, batch 1) per configuration, each in its own subprocess
(:func:`benchmarks.common.run_isolated`) under a wall-clock limit. Methods:

``eager``          the transformers torch path (``mamba_selective_scan``'s sequential loop:
                   eager transformers runs the loop whatever ``use_associative_scan`` says);
``compile_assoc``  plain ``torch.compile`` (Inductor) with ``use_associative_scan=True``
                   (the "generic" associative scan, unrolled into a log-depth tree);
``compile_loop``   plain ``torch.compile`` with ``use_associative_scan=False`` (the loop,
                   unrolled over T: compile time grows with T);
``ours``           ``longctx_compiler.optimize(model, ssm={"chunk_size": Q})`` (Inductor):
                   the scan captured as one canonical node per layer, adjoint-sharded.

Peak memory is the process's resident-set high-water mark during the step above its value
when the step began, sampled every millisecond from ``/proc/self/statm`` (the same meter for
every method; the CPU profiler replay of :func:`longctx_compiler.memory.measure_step` takes
longer than the step itself on the eager loop's tens of thousands of small ops). The child
runs with ``MALLOC_MMAP_THRESHOLD_`` set so that freed tensors leave the resident set.
A method is not run at larger T after it timed out or ran out of memory at a smaller one
(recorded as ``skipped``). Step times on a shared CPU are relative figures only.

Run: ``python -m benchmarks.run ssm --help``.
"""

from __future__ import annotations

import argparse
import gc
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
#: Targets of the issue: memory and time at this length.
TARGET_T = 2048

logger = logging.getLogger("longctx_compiler.benchmarks")


class _RssSampler:
    """Peak resident bytes of this process while active, sampled from /proc/self/statm."""

    def __init__(self, period_s: float = 0.001) -> None:
        self.period_s = period_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
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


def ssm_step(*, method: str, tokens: int, layers: int, hidden: int, state: int, vocab: int, chunk_size: int,
             warmup_tokens: int, step_limit_s: float, seed: int) -> dict[str, Any]:
    """One MambaForCausalLM training step with ``method``: peak RSS over the step, step time."""
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import torch
    import transformers

    import longctx_compiler as lc

    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(hidden_size=hidden, state_size=state, num_hidden_layers=layers, vocab_size=vocab,
                                   use_associative_scan=method != "compile_loop")
    model = transformers.MambaForCausalLM(cfg).float().train()
    if method == "ours":
        run = lc.optimize(model, ssm={"chunk_size": chunk_size})
    elif method in ("compile_assoc", "compile_loop"):
        run = torch.compile(model, backend="inductor")
    elif method == "eager":
        run = model
    else:
        raise ValueError(f"unknown method {method!r}; one of {METHODS}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)

    def step(x):
        run(x, labels=x).loss.backward()

    def zero():
        model.zero_grad(set_to_none=True)
        gc.collect()

    out: dict[str, Any] = {"method": method, "tokens": tokens}
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
    report_progress(out)
    zero()
    with _RssSampler() as mem:
        t0 = time.perf_counter()
        step(ids)
        first = time.perf_counter() - t0
    out["peak_bytes"] = mem.peak - mem.start
    report_progress(out)
    if first > step_limit_s:
        out["step_s"] = first
        report_progress(out)
        raise StepTimeout(f"the measured step took {first:.1f} s > limit {step_limit_s:.0f} s")
    zero()
    t0 = time.perf_counter()
    step(ids)
    second = time.perf_counter() - t0
    out["step_s"] = min(first, second)
    out["step_times_s"] = [first, second]
    if method == "ours":
        out["compile_count"] = run.compile_count
    return out


def _line(rec: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    return (f"{token_label(rec['tokens']):>5s} {rec['method']:14s} {rec['status']:8s} {fmt_bytes(rec.get('peak_bytes')):>10s} "
            f"{f(rec.get('step_s')):>8s} {f(rec.get('compile_s')):>8s}")


def _targets(records: list[dict[str, Any]], cfg: dict[str, Any]) -> dict[str, Any]:
    by = {(r["method"], r["tokens"]): r for r in records}
    out: dict[str, Any] = {}
    ours = by.get(("ours", TARGET_T), {})
    for base in ("eager", "compile_assoc"):
        b = by.get((base, TARGET_T), {})
        mem_ratio = ratio(b.get("peak_bytes"), ours.get("peak_bytes"))
        time_ratio = ratio(ours.get("step_s"), b.get("step_s"))
        out[f"2K_memory_10x_less_than_{base}"] = {
            "pass": mem_ratio is not None and mem_ratio >= 10, "baseline_over_ours": mem_ratio,
            "baseline_status": b.get("status"),
        }
        out[f"2K_time_not_more_than_{base}"] = {
            "pass": time_ratio is not None and time_ratio <= 1.0, "ours_over_baseline": time_ratio,
            "baseline_status": b.get("status"),
        }
    done = sorted(r["tokens"] for r in records if r["method"] == "ours" and r["status"] == OK)
    largest = done[-1] if done else None
    out["64K_step_completes"] = {"pass": largest is not None and largest >= 65536, "largest_T_completed": largest,
                                 "step_s": by.get(("ours", largest), {}).get("step_s") if largest else None}
    # Peak grows like O(T·D) + O(T/Q·D·N): per-token bytes must not grow like D·N. Fit the
    # slope between the two largest completed lengths and compare with the O(T·D·N) rate of
    # one float32 state per token and layer.
    pts = [(r["tokens"], r["peak_bytes"]) for r in records if r["method"] == "ours" and r["status"] == OK and r.get("peak_bytes")]
    pts.sort()
    d_inner = 2 * cfg["hidden"]
    if len(pts) >= 2:
        (t0, p0), (t1, p1) = pts[-2], pts[-1]
        per_token = (p1 - p0) / (t1 - t0)
        tdn_per_token = 4 * d_inner * cfg["state"] * cfg["layers"]
        out["peak_not_O_TDN"] = {"pass": per_token < 0.5 * tdn_per_token, "bytes_per_token_slope": per_token,
                                 "O_TDN_bytes_per_token": tdn_per_token, "between_T": [t0, t1]}
    else:
        out["peak_not_O_TDN"] = {"pass": False, "reason": "fewer than two completed lengths"}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run ssm", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", nargs="+", default=["1K", "2K", "4K", "8K", "16K", "32K", "64K"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--state", type=int, default=16)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=256)
    p.add_argument("--warmup-tokens", type=int, default=512)
    p.add_argument("--timeout", type=float, default=240.0, help="wall-clock limit of one configuration (s)")
    p.add_argument("--step-limit", type=float, default=120.0, help="give up a method once a step takes longer (s)")
    p.add_argument("--out", default=str(RESULTS_DIR / "ssm_cpu.json"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokens = sorted(parse_tokens(args.tokens))
    cfg = {"layers": args.layers, "hidden": args.hidden, "state": args.state, "vocab": args.vocab, "chunk_size": args.chunk_size}
    records: list[dict[str, Any]] = []
    stopped: dict[str, str] = {}
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    print(f"{'T':>5s} {'method':14s} {'status':8s} {'peak':>10s} {'step_s':>8s} {'compile':>8s}", flush=True)
    t_start = time.perf_counter()
    for t in tokens:
        for method in args.methods:
            if method in stopped:
                rec = {"method": method, "tokens": t, "status": SKIPPED, "reason": f"{stopped[method]} at a smaller T"}
            else:
                res = run_isolated("benchmarks.bench_ssm", "ssm_step", dict(method=method, tokens=t, warmup_tokens=args.warmup_tokens,
                                   step_limit_s=args.step_limit, seed=0, **cfg), timeout_s=args.timeout, env=env)
                rec = {"method": method, "tokens": t, "status": res["status"], "wall_s": res.get("wall_s")}
                rec.update({k: v for k, v in (res.get("result") or res.get("progress") or {}).items() if k not in ("method", "tokens")})
                if res["status"] != OK:
                    rec["error"] = res.get("error")
                    if res["status"] in (TIMEOUT, OOM):
                        stopped[method] = res["status"]
            records.append(rec)
            print(_line(rec), flush=True)
    targets = _targets(records, cfg)
    print("\ntargets:")
    for name, v in targets.items():
        print(f"  {'PASS' if v['pass'] else 'FAIL'}  {name}: {v}")
    write_results(args.out, {
        "benchmark": "ssm", "config": cfg, "records": records, "targets": targets,
        "sweep_wall_s": round(time.perf_counter() - t_start, 1),
        "notes": [
            "peak_bytes: resident-set high-water mark during one step above its start (sampled 1 ms, glibc mmap threshold 64 KiB).",
            "step_s: the faster of two steps at T after warm-up; compile_s: the first call (for plain torch.compile at T itself).",
            "eager runs transformers' sequential loop in either use_associative_scan setting (associative_scan is used only while compiling).",
            "a method is skipped at larger T after it timed out or ran out of memory.",
        ],
        "environment": env_metadata(),
    })
    fig, axes = new_figure(1, 2)
    series = {m: [(r["tokens"], r.get("peak_bytes") if r["status"] == OK else None) for r in records if r["method"] == m] for m in args.methods}
    plot_series(axes[0][0], series, title=f"Mamba step: peak RSS ({args.layers} layers, d={args.hidden}, N={args.state})", xlabel="T (tokens)", ylabel="bytes")
    series = {m: [(r["tokens"], r.get("step_s") if r["status"] == OK else None) for r in records if r["method"] == m] for m in args.methods}
    plot_series(axes[0][1], series, title="Mamba step: time (CPU, relative)", xlabel="T (tokens)", ylabel="seconds")
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
