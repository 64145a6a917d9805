"""Attention memory and step time across sequence lengths: baselines vs. chunked attention.

Two sweeps over the sequence length T, each configuration in its own subprocess
(:func:`benchmarks.common.run_isolated`):

* **model** — one training step (forward, loss, backward) of a small Llama
  (``transformers.LlamaForCausalLM`` from a config, random weights, float32, SDPA attention)
  with five methods:

  ``eager_sdpa``      plain eager PyTorch (the baseline every ratio is taken against);
  ``checkpoint``      ``model.gradient_checkpointing_enable(use_reentrant=False)``, one
                      checkpoint per decoder layer;
  ``save_on_cpu``     the step inside ``torch.autograd.graph.save_on_cpu(pin_memory=False)``;
  ``ours``            ``longctx_compiler.optimize(model, attention={"chunk_size": C, "offload": False})``;
  ``ours_offload``    the same with ``offload=True`` (q/k/v/out/lse in the host pool).

  Per run: peak device bytes, saved-for-backward bytes and host-tier bytes of one step
  (:func:`longctx_compiler.memory.measure_step`), the step time (median of ``--repeats``
  timed steps after the measured one) and, for compiled methods, the compile time.

* **attention_only** — the attention core of one layer alone, on that layer's shapes
  (q ``[1, H, T, Dh]``, k/v ``[1, Hkv, T, Dh]``): ``F.scaled_dot_product_attention(q, k, v,
  is_causal=True, enable_gqa=True)`` (what ``transformers`` calls) eagerly, and the same
  function through ``optimize`` (rewritten into our op, offload off/on); loss ``out.sum()``.
  Its saved bytes are exactly what the attention node keeps for backward.

Step times on a CPU are relative figures only (shared cores, no GPU kernels).
Run: ``python -m benchmarks.run attention --help``.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    OK, RESULTS_DIR, SKIPPED, TIMEOUT, StepTimeout, CountingSaveOnCpu, env_metadata, fmt_bytes, new_figure, parse_tokens, plot_series,
    ratio, report_progress, run_isolated, time_steps, token_label, write_results,
)

MODEL_METHODS = ("eager_sdpa", "checkpoint", "save_on_cpu", "ours", "ours_offload")
ATTN_METHODS = ("sdpa", "ours", "ours_offload")
BASELINE = {"model": "eager_sdpa", "attention_only": "sdpa"}
#: The issue's target length for the offload check.
TARGET_T = 32768

logger = logging.getLogger("longctx_compiler.benchmarks")


# ------------------------------------------------------------------------------ workers
def _quiet() -> None:
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)


def _build_llama(*, layers, hidden, heads, kv_heads, head_dim, intermediate, vocab, max_tokens, seed):
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        vocab_size=vocab, max_position_embeddings=max(max_tokens, 4096), attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(cfg).float()
    model.train()
    return model


def model_step(*, method: str, tokens: int, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int,
               intermediate: int, vocab: int, chunk_size: int, backend: str, repeats: int, step_limit_s: float,
               warmup_tokens: int, seed: int) -> dict[str, Any]:
    """One Llama training step with ``method``: memory (one profiled step) and time."""
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
    elif method in ("ours", "ours_offload"):
        run = lc.optimize(model, backend=backend, attention={"chunk_size": chunk_size, "offload": method == "ours_offload"})
    elif method not in ("eager_sdpa", "save_on_cpu"):
        raise ValueError(f"unknown model method {method!r}; one of {MODEL_METHODS}")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)
    host_counter: list[CountingSaveOnCpu] = []

    def step_on(x):
        if method == "save_on_cpu":
            ctx = CountingSaveOnCpu(pin_memory=False)
            host_counter.append(ctx)
            with ctx:
                loss = run(x, labels=x).loss
                loss.backward()
        else:
            run(x, labels=x).loss.backward()

    def zero():
        model.zero_grad(set_to_none=True)
        gc.collect()

    out: dict[str, Any] = {"method": method, "tokens": tokens}
    # Warm-up at a short length: compiles (one graph serves every T, the sequence dim is
    # dynamic) and runs lazy initialisation, so neither counts in the measured step.
    warm_ids = torch.randint(0, vocab, (1, min(warmup_tokens, tokens)), generator=gen)
    t0 = time.perf_counter()
    step_on(warm_ids)
    out["warmup_s"] = time.perf_counter() - t0
    compiled = run is not model
    if compiled:
        out["compile_s"] = out["warmup_s"]
        out["compile_count_after_warmup"] = run.compile_count
        out["attention_rewrites"] = run.report.count("chunked_attention")
    report_progress(out)

    zero()
    t0 = time.perf_counter()
    mem = measure_step(lambda: step_on(ids), parameters=model, host_pool=get_default_pool())
    out["profiled_step_s"] = time.perf_counter() - t0
    out.update(_memory_fields(mem))
    if method == "save_on_cpu":
        out["host_bytes"] = host_counter[-1].host_bytes
        out["host_bytes_source"] = "bytes packed by save_on_cpu (no copy on a CPU-only machine)"
    if compiled:
        out["compile_count"] = run.compile_count
        out["recompiled_at_T"] = run.compile_count != out["compile_count_after_warmup"]
    report_progress(out)
    if out["profiled_step_s"] > step_limit_s:
        raise StepTimeout(f"the profiled step took {out['profiled_step_s']:.1f} s > limit {step_limit_s:.0f} s")

    timing = time_steps(lambda: step_on(ids), repeats=repeats, before_each=zero, limit_s=step_limit_s)
    out["step_s"] = timing["median_s"]
    out["step_times_s"] = timing["times_s"]
    return out


def attention_step(*, method: str, tokens: int, heads: int, kv_heads: int, head_dim: int, chunk_size: int,
                   backend: str, warmup_tokens: int, step_limit_s: float, seed: int) -> dict[str, Any]:
    """The attention core of one layer alone: forward, ``out.sum()``, backward (memory only)."""
    _quiet()
    import torch
    import torch.nn.functional as F

    import longctx_compiler as lc
    from longctx_compiler.memory import measure_step
    from longctx_compiler.runtime import get_default_pool

    def attn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    gen = torch.Generator().manual_seed(seed)

    def leaves(t):
        return [torch.randn(1, h, t, head_dim, generator=gen).requires_grad_() for h in (heads, kv_heads, kv_heads)]

    fn = attn
    out: dict[str, Any] = {"method": method, "tokens": tokens}
    if method in ("ours", "ours_offload"):
        # Inputs are [B, H, T, D]: the sequence is dim 2 (the default, 1, would be the heads).
        fn = lc.optimize(attn, backend=backend, sequence_dim=2,
                         attention={"chunk_size": chunk_size, "offload": method == "ours_offload"})
    elif method != "sdpa":
        raise ValueError(f"unknown attention method {method!r}; one of {ATTN_METHODS}")

    def step_on(q0, k0, v0):
        for t in (q0, k0, v0):
            t.grad = None
        # Non-leaf inputs that nothing but the attention node keeps (like projections in a
        # model): what stays resident is what the node saved.
        fn(q0.clone(), k0.clone(), v0.clone()).sum().backward()

    t0 = time.perf_counter()
    step_on(*leaves(min(warmup_tokens, tokens)))
    out["warmup_s"] = time.perf_counter() - t0
    if fn is not attn:
        out["compile_s"] = out["warmup_s"]
        out["attention_rewrites"] = fn.report.count("chunked_attention")
        warm_count = fn.compile_count
    q0, k0, v0 = leaves(tokens)
    gc.collect()
    t0 = time.perf_counter()
    mem = measure_step(lambda: step_on(q0, k0, v0), host_pool=get_default_pool())
    out["profiled_step_s"] = time.perf_counter() - t0
    out.update(_memory_fields(mem))
    if fn is not attn:
        out["recompiled_at_T"] = fn.compile_count != warm_count
    # The O(T·d) tensors of an exact attention step: forward inputs q, k, v, output and lse;
    # backward input dout (the loss's gradient, materialised by the backward) and outputs
    # dq, dk, dv. Whatever the peak holds beyond these is the method's working set.
    esz = q0.element_size()
    qkv = (heads + 2 * kv_heads) * tokens * head_dim * esz
    o = heads * tokens * head_dim * esz
    out["io_bytes"] = {"q_k_v": qkv, "out": o, "lse_fp32": heads * tokens * 4, "dout": o, "dq_dk_dv": qkv}
    out["io_bytes_total"] = sum(out["io_bytes"].values())
    out["peak_minus_io_bytes"] = out["peak_bytes"] - out["io_bytes_total"]
    # The measurement is complete either way; a slow step only stops the sweep from growing T.
    out["over_step_limit"] = out["profiled_step_s"] > step_limit_s
    return out


def _memory_fields(mem) -> dict[str, Any]:
    return {
        "peak_bytes": mem.peak_bytes,
        "saved_bytes": mem.saved_for_backward_bytes,
        "saved_param_bytes": mem.saved_param_bytes,
        "host_bytes": mem.host_pool_peak_bytes,
    }


# ------------------------------------------------------------------------------ sweep
def _predict_step_s(history: list[tuple[int, float]], tokens: int) -> float | None:
    """Extrapolate a method's step time to ``tokens`` from its largest measured T.

    Quadratic in T (attention's FLOPs): an upper bound when linear work still dominates.
    """
    if not history:
        return None
    t_prev, s_prev = max(history)
    return s_prev * (tokens / t_prev) ** 2


def _sweep(kind: str, methods: tuple[str, ...], worker: str, base_kwargs: dict[str, Any], args, clock) -> list[dict[str, Any]]:
    records: list[dict[str, Any]] = []
    history: dict[str, list[tuple[int, float]]] = {m: [] for m in methods}
    dead: dict[str, str] = {}
    overhead: list[float] = []
    steps_per_run = 1 + (args.repeats if kind == "model" else 0)
    for tokens in args.tokens:
        for method in methods:
            rec: dict[str, Any] = {"method": method, "tokens": tokens}
            predicted = _predict_step_s(history[method], tokens)
            est_cost = (max(overhead) if overhead else 0.0) + steps_per_run * (predicted or 0.0)
            if method in dead:
                rec.update(status=TIMEOUT, timeout_kind="after_smaller_T", error=dead[method])
            elif kind == "model" and predicted is not None and predicted > args.step_limit:
                # Only the model sweep skips on a prediction: its runs cost 1 + repeats steps.
                # An attention-only run is one step, so it is tried and judged by measurement.
                rec.update(status=TIMEOUT, timeout_kind="predicted", predicted_step_s=round(predicted, 1),
                           error=f"predicted step {predicted:.0f} s > limit {args.step_limit:.0f} s (quadratic extrapolation)")
                dead[method] = f"{token_label(tokens)} already predicted over the step limit"
            elif args.budget is not None and clock() + est_cost > args.budget:
                rec.update(status=SKIPPED, error=f"sweep budget {args.budget:.0f} s: about {est_cost:.0f} s more needed, "
                                                 f"{max(0.0, args.budget - clock()):.0f} s left")
            else:
                timeout = args.timeout or (args.step_limit * (steps_per_run + 1) + 240)
                res = run_isolated("benchmarks.bench_attention", worker, dict(base_kwargs, method=method, tokens=tokens),
                                   timeout_s=timeout)
                rec.update({k: v for k, v in res.items() if k != "result"})
                partial = res.get("result") or res.get("progress") or {}
                rec.update({k: v for k, v in partial.items() if k not in rec or k in ("method", "tokens")})
                if res["status"] == OK:
                    steps = [rec.get("profiled_step_s")] + [rec.get("step_s")]
                    history[method].append((tokens, max(s for s in steps if s is not None)))
                    overhead.append(max(0.0, res["wall_s"] - sum(rec.get("step_times_s", [])) - rec.get("profiled_step_s", 0.0)))
                if res["status"] in (TIMEOUT, "oom"):
                    dead[method] = f"{token_label(tokens)} ended with {res['status']}"
                elif rec.get("over_step_limit"):
                    dead[method] = f"the step at {token_label(tokens)} took {rec['profiled_step_s']:.0f} s > limit {args.step_limit:.0f} s"
            records.append(rec)
            _print_progress(kind, rec)
    _add_ratios(records, BASELINE[kind])
    return records


def _print_progress(kind: str, rec: dict[str, Any]) -> None:
    status = rec["status"]
    line = f"[{kind:14s}] T={token_label(rec['tokens']):>4s} {rec['method']:13s} {status:8s}"
    if "peak_bytes" in rec:
        line += f" peak {fmt_bytes(rec['peak_bytes']):>10s} saved {fmt_bytes(rec['saved_bytes']):>10s} host {fmt_bytes(rec['host_bytes']):>10s}"
    if rec.get("step_s") is not None:
        line += f" step {rec['step_s']:.2f} s"
    if rec.get("compile_s") is not None:
        line += f" compile {rec['compile_s']:.1f} s"
    if status != OK and rec.get("error"):
        line += f"  ({rec['error']})"
    print(line, flush=True)


def _add_ratios(records: list[dict[str, Any]], baseline: str) -> None:
    base = {r["tokens"]: r for r in records if r["method"] == baseline and "peak_bytes" in r}
    for r in records:
        b = base.get(r["tokens"])
        if b is None or "peak_bytes" not in r:
            continue
        r["vs_" + baseline] = {
            "peak": ratio(r["peak_bytes"], b["peak_bytes"]),
            "saved": ratio(r["saved_bytes"], b["saved_bytes"]),
            "device_plus_host": ratio(r["peak_bytes"] + r["host_bytes"], b["peak_bytes"] + b["host_bytes"]),
            "time": ratio(r.get("step_s"), b.get("step_s")),
        }


# ------------------------------------------------------------------------------ targets
def _find(records, method, tokens=None):
    return [r for r in records if r["method"] == method and r["status"] == OK and (tokens is None or r["tokens"] == tokens)]


def check_targets(attn: list[dict[str, Any]], flat_tolerance: float = 1.25) -> list[dict[str, Any]]:
    """The issue's targets, judged on the attention-only sweep. Printed, never asserted."""
    targets = []
    sd, off = _find(attn, "sdpa", TARGET_T), _find(attn, "ours_offload", TARGET_T)
    t1 = {"name": "offload: attention saved device bytes >= 8x smaller than eager SDPA at T=32K"}
    if sd and off:
        r = ratio(sd[0]["saved_bytes"], off[0]["saved_bytes"]) if off[0]["saved_bytes"] else math.inf
        t1.update(result="PASS" if r >= 8 else "FAIL", sdpa_saved_bytes=sd[0]["saved_bytes"],
                  ours_offload_saved_bytes=off[0]["saved_bytes"], reduction=r if r != math.inf else "inf")
    else:
        t1.update(result="NOT MEASURED", detail="no successful sdpa and ours_offload run at T=32K")
    targets.append(t1)

    t2 = {"name": "no offload: attention saved bytes no larger than eager SDPA's (every measured T)"}
    pairs = [(s, o) for s in _find(attn, "sdpa") for o in _find(attn, "ours") if s["tokens"] == o["tokens"]]
    if pairs:
        worst = max(pairs, key=lambda p: p[1]["saved_bytes"] / max(p[0]["saved_bytes"], 1))
        t2.update(result="PASS" if all(o["saved_bytes"] <= s["saved_bytes"] for s, o in pairs) else "FAIL",
                  tokens=[s["tokens"] for s, _ in pairs],
                  worst_ratio=worst[1]["saved_bytes"] / max(worst[0]["saved_bytes"], 1), worst_T=worst[0]["tokens"])
    else:
        t2.update(result="NOT MEASURED", detail="no T with both sdpa and ours measured")
    targets.append(t2)

    # Flat in T: with offload, what autograd keeps on the device is the same at every T; and
    # for both of our variants the device working set beyond the O(T·d) tensors
    # (peak − io_bytes_total) does not grow with T at a fixed chunk size.
    t3 = {"name": "device-resident attention memory flat in T at fixed chunk size (beyond O(T·d) inputs/outputs)",
          "tolerance": flat_tolerance}
    offs, ours = _find(attn, "ours_offload"), _find(attn, "ours")
    if len(offs) >= 2 and len(ours) >= 2:
        saved = [r["saved_bytes"] for r in offs]
        excess = {m: {r["tokens"]: r["peak_minus_io_bytes"] for r in rs} for m, rs in (("ours", ours), ("ours_offload", offs))}
        growth = {}
        for m, ex in excess.items():
            lo = ex[min(ex)]
            growth[m] = max(ex.values()) / lo if lo > 0 else None
        ok = max(saved) == min(saved) and all(g is not None and g <= flat_tolerance for g in growth.values())
        t3.update(result="PASS" if ok else "FAIL", offload_saved_bytes_by_T={r["tokens"]: r["saved_bytes"] for r in offs},
                  peak_minus_io_bytes_by_T=excess, growth_max_over_smallest_T=growth)
    else:
        t3.update(result="NOT MEASURED", detail="fewer than two T measured for ours / ours_offload")
    targets.append(t3)
    return targets


# ------------------------------------------------------------------------------ output
def _table(records: list[dict[str, Any]], baseline: str, with_time: bool) -> str:
    hdr = f"{'T':>5s} {'method':13s} {'status':8s} {'peak':>10s} {'saved':>10s} {'host':>10s}"
    hdr += f" {'peak/base':>9s} {'saved/base':>10s}"
    if with_time:
        hdr += f" {'step s':>7s} {'time/base':>9s} {'compile s':>9s}"
    lines = [hdr]
    for r in records:
        v = r.get("vs_" + baseline, {})
        f = lambda x: "-" if x is None else f"{x:.3g}"  # noqa: E731
        line = f"{token_label(r['tokens']):>5s} {r['method']:13s} {r['status']:8s} {fmt_bytes(r.get('peak_bytes')):>10s} " \
               f"{fmt_bytes(r.get('saved_bytes')):>10s} {fmt_bytes(r.get('host_bytes')):>10s} {f(v.get('peak')):>9s} {f(v.get('saved')):>10s}"
        if with_time:
            line += f" {f(r.get('step_s')):>7s} {f(v.get('time')):>9s} {f(r.get('compile_s')):>9s}"
        lines.append(line)
    return "\n".join(lines)


def plot(doc: dict[str, Any], path: Path) -> Path:
    model, attn = doc["model"]["runs"], doc["attention_only"]["runs"]
    fig, axes = new_figure(2, 2)

    def series(records, methods, key):
        return {m: [(r["tokens"], r.get(key)) for r in records if r["method"] == m and r["status"] == OK] for m in methods}

    cfg = doc["config"]
    plot_series(axes[0][0], series(model, MODEL_METHODS, "peak_bytes"), title=f"Llama step: peak device bytes ({cfg['layers']} layers)",
                xlabel="T (tokens)", ylabel="bytes")
    plot_series(axes[0][1], series(model, MODEL_METHODS, "step_s"), title="Llama step: time (CPU, relative only)",
                xlabel="T (tokens)", ylabel="seconds")
    plot_series(axes[1][0], series(model, MODEL_METHODS, "saved_bytes"), title="Llama step: saved-for-backward bytes (device)",
                xlabel="T (tokens)", ylabel="bytes")
    att = {f"{m} saved": pts for m, pts in series(attn, ATTN_METHODS, "saved_bytes").items()}
    att.update({f"{m} peak": pts for m, pts in series(attn, ATTN_METHODS, "peak_bytes").items()})
    styles = {f"{m} peak": {"linestyle": "--"} for m in ATTN_METHODS}
    plot_series(axes[1][1], att, title=f"one attention layer: device bytes (chunk {cfg['chunk_size']})",
                xlabel="T (tokens)", ylabel="bytes", styles=styles)
    failed = [f"{r['method']}@{token_label(r['tokens'])}:{r['status']}" for r in model + attn if r["status"] != OK]
    if failed:
        fig.text(0.01, 0.005, "not measured: " + ", ".join(failed), fontsize=6, wrap=True)
    fig.suptitle(f"longctx attention benchmark — {doc['environment'].get('device')}, torch {doc['environment'].get('torch')}", fontsize=11)
    fig.tight_layout(rect=(0, 0.03, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ------------------------------------------------------------------------------ main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run attention", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tokens", nargs="+", default=["2K", "4K", "8K", "16K", "32K"], help="sequence lengths (2K = 2048)")
    p.add_argument("--chunk-size", type=int, default=512, help="chunk size of our attention op")
    p.add_argument("--backend", choices=("aot_eager", "inductor"), default="aot_eager", help="backend for ours")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--intermediate", type=int, default=512)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="timed steps per model run (after the profiled one)")
    p.add_argument("--warmup-tokens", type=int, default=256, help="length of the warm-up/compile step")
    p.add_argument("--step-limit", type=float, default=180.0, help="seconds one step may take before T stops growing")
    p.add_argument("--timeout", type=float, default=None, help="wall-clock limit per run (default from --step-limit)")
    p.add_argument("--budget", type=float, default=1200.0, help="seconds for the whole sweep; runs that would not fit are skipped")
    p.add_argument("--methods", nargs="+", default=list(MODEL_METHODS), choices=MODEL_METHODS)
    p.add_argument("--attention-methods", nargs="+", default=list(ATTN_METHODS), choices=ATTN_METHODS)
    p.add_argument("--skip-model", action="store_true", help="only the attention-only sweep")
    p.add_argument("--skip-attention", action="store_true", help="only the model sweep")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "attention_cpu.json")
    p.add_argument("--plot", type=Path, default=None, help="PNG path (default: --out with .png)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.tokens = sorted(set(parse_tokens(args.tokens)))
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # The baseline must run for ratios to exist.
    methods = tuple(m for m in MODEL_METHODS if m in args.methods or m == BASELINE["model"])
    attn_methods = tuple(m for m in ATTN_METHODS if m in args.attention_methods or m == BASELINE["attention_only"])
    start = time.perf_counter()
    clock = lambda: time.perf_counter() - start  # noqa: E731
    common = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, chunk_size=args.chunk_size,
                  backend=args.backend, warmup_tokens=args.warmup_tokens, step_limit_s=args.step_limit, seed=args.seed)
    # Attention-only first: the targets are judged on it, so it gets the budget first.
    attn = [] if args.skip_attention else _sweep("attention_only", attn_methods, "attention_step", common, args, clock)
    model_kwargs = dict(common, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab,
                        repeats=args.repeats)
    model = [] if args.skip_model else _sweep("model", methods, "model_step", model_kwargs, args, clock)
    targets = check_targets(attn)
    doc = {
        "benchmark": "attention",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "units": {"bytes": "bytes", "time": "seconds"},
        "notes": [
            "peak_bytes: device (here CPU) high-water mark of one step above its start, host-pool buffers excluded; "
            "saved_bytes: distinct non-parameter storages autograd packed for backward; host_bytes: host tier "
            "(our offload pool's peak, or what save_on_cpu packed).",
            "Ratios (vs_<baseline>) are method / baseline at the same T; < 1 is better.",
            "Step times are on a shared CPU: only ratios within this run mean anything; absolute times only from a GPU.",
            "save_on_cpu on a CPU-only machine relocates nothing (tensor.cpu() is the tensor): its peak equals eager's; "
            "its saved_bytes read 0 because its own hooks take the tensors (they are counted as host_bytes).",
            "checkpoint: the layer inputs non-reentrant checkpointing keeps are held outside autograd's saved tensors; "
            "they show in peak_bytes, not saved_bytes.",
            "compile_s: wall time of the first call (at --warmup-tokens), one short step included.",
        ],
        "model": {"baseline": BASELINE["model"], "runs": model},
        "attention_only": {"baseline": BASELINE["attention_only"], "runs": attn},
        "targets": targets,
        "sweep_wall_s": round(clock(), 1),
        "environment": env_metadata(),
    }
    path = write_results(args.out, doc)
    print(f"\nwrote {path}")
    if not args.no_plot:
        print(f"wrote {plot(doc, args.plot or Path(args.out).with_suffix('.png'))}")
    if attn:
        print("\nattention only (one layer), vs sdpa:\n" + _table(attn, "sdpa", with_time=False))
    if model:
        print(f"\nLlama ({args.layers} layers) training step, vs eager_sdpa:\n" + _table(model, "eager_sdpa", with_time=True))
    print()
    for t in targets:
        detail = {k: v for k, v in t.items() if k not in ("name", "result")}
        print(f"{t['result']}: {t['name']}  {detail}")
    print(f"\nsweep took {clock():.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
