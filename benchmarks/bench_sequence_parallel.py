"""Sequence parallelism on gloo: per-rank device peak and bytes communicated, against one process.

The Llama of the layers benchmark (``transformers.LlamaForCausalLM``, hidden 256, 4 layers,
8/2 heads, SwiGLU 688, vocabulary 16000, float32), ``optimize(model)`` with its defaults
(attention chunked and offloaded, LM loss tiled), one training step at ``T`` tokens:

``P = 1``   one process, the whole sequence (the baseline);
``P = 2, 4`` ``distributed={"sequence_parallel": P}``: P processes (gloo on CPU, started as
            ``torchrun`` would), each with ``⌈T/P⌉`` tokens; Ulysses all-to-all around attention.

``--model mamba``: the SSM benchmark's Mamba (2 layers, hidden 32, state 16), its scans
sharded over time: bytes sent per step ``layers · 2·B·D·(N + K−1)·(P−1)·4`` (each scan's
decay and final state, each convolution's halo, forward and backward), independent of T.
Both runs use the same rewrites (SSM blocks, which step aside under sequence parallelism,
off on one process too).

Per run: the largest per-rank device peak of one step (:func:`measure_step`, host pool apart),
the bytes each rank sent per step by collective, and the step time. Targets (issue 13): the
per-rank peak ``≤ 1.3/P`` of one process's, and the all-to-all bytes within 10 % of the
formula ``2 · layers · (2·H + 2·max(H_kv, P)) · B · L · D · (P−1)/P · 4`` bytes
(forward and backward: q, k, v and the output each way; :func:`all_to_all_elements`).
The ranks share this machine's cores, so step times are relative figures only.

Run: ``python -m benchmarks.run sequence_parallel --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, env_metadata, fmt_bytes, new_figure, parse_tokens, plot_series, token_label, write_results

MODEL = dict(layers=4, hidden=256, heads=8, kv_heads=2, head_dim=32, intermediate=688, vocab=16000)
#: The SSM benchmark's Mamba (``bench_ssm.py``): 2 layers, hidden 32, state 16, vocabulary 256.
MAMBA = dict(layers=2, hidden=32, state=16, vocab=256)


def _build(model: str, tokens: int, seed: int):
    import torch
    import transformers

    from benchmarks.bench_attention import _build_llama

    if model == "llama":
        return _build_llama(**MODEL, max_tokens=tokens, seed=seed), MODEL["vocab"]
    torch.manual_seed(seed)
    cfg = transformers.MambaConfig(hidden_size=MAMBA["hidden"], state_size=MAMBA["state"], num_hidden_layers=MAMBA["layers"],
                                   vocab_size=MAMBA["vocab"])
    return transformers.MambaForCausalLM(cfg).float().train(), MAMBA["vocab"]


def rank_step(model_name: str, tokens: int, P: int, out: str, warmup_tokens: int, seed: int) -> None:
    """One rank's run (a process of its own, RANK/WORLD_SIZE/MASTER_* in the environment)."""
    import torch
    import torch.distributed as dist

    import longctx_compiler as lc
    from benchmarks.bench_attention import _quiet
    from longctx_compiler.memory import measure_step
    from longctx_compiler.runtime import get_default_pool
    from longctx_compiler.runtime.sequence_parallel import communication, reset_communication

    _quiet()
    if P > 1:
        dist.init_process_group("gloo")
    model, vocab = _build(model_name, tokens, seed)
    opt = lc.optimize(model, backend="aot_eager", distributed={"sequence_parallel": P if P > 1 else None},
                      # one process compared with the same rewrites P ranks get (blocks step aside there)
                      ssm={"shard_blocks": False, "recompute_blocks": False})
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (1, tokens), generator=gen)

    def step(x):
        opt(x, labels=x, use_cache=False).loss.backward()

    step(ids[:, :warmup_tokens])  # compile
    step(ids[:, :warmup_tokens + 2])  # ... and the dynamic-length graph
    model.zero_grad(set_to_none=True)
    mem = measure_step(lambda: step(ids), parameters=model, host_pool=get_default_pool())
    model.zero_grad(set_to_none=True)
    reset_communication()
    t0 = time.perf_counter()
    step(ids)
    step_s = time.perf_counter() - t0
    result = {"rank": int(os.environ.get("RANK", 0)), "peak_bytes": mem.peak_bytes, "host_bytes": mem.host_pool_peak_bytes,
              "step_s": step_s, "sent": communication(), "compiles": opt.compile_count,
              "ulysses": sum(1 for r in opt.report.rewrites if "Ulysses" in r.kind)}
    Path(out).write_text(json.dumps(result))
    if P > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model: str, tokens: int, P: int, tmp: Path, warmup_tokens: int, seed: int, timeout: float) -> list[dict[str, Any]]:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(P),
               OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // P)))
    procs = []
    for rank in range(P):
        out = tmp / f"{model}_sp{P}_{tokens}_rank{rank}.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_sequence_parallel", "--rank-worker", "--model", model, "--tokens", str(tokens),
               "--P", str(P), "--worker-out", str(out), "--warmup-tokens", str(warmup_tokens), "--seed", str(seed)]
        procs.append((out, subprocess.Popen(cmd, env=dict(env, RANK=str(rank)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    results = []
    for out, p in procs:
        log, _ = p.communicate(timeout=timeout)
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"rank failed (P={P}, T={tokens}):\n{log[-3000:]}")
        results.append(json.loads(out.read_text()))
    return results


def formula_bytes(model: str, P: int):
    """Bytes one rank sends per step, as a function of T: Llama's all-to-all (forward and
    backward, float32); Mamba's scan states and convolution halos, independent of T."""
    from longctx_compiler.runtime.sequence_parallel import all_to_all_elements, scan_exchange_elements

    if model == "llama":
        return lambda t: 2 * MODEL["layers"] * all_to_all_elements(1, MODEL["heads"], MODEL["kv_heads"], MODEL["head_dim"], t, P) * 4
    inner = 2 * MAMBA["hidden"]  # expand 2
    return lambda t: MAMBA["layers"] * scan_exchange_elements(1, inner, MAMBA["state"], 3, P) * 4


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run sequence_parallel", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", choices=("llama", "mamba"), default="llama")
    p.add_argument("--tokens", nargs="+", default=["8K"], help="sequence lengths (8K = 8192)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="sequence-parallel sizes P (1: one process)")
    p.add_argument("--warmup-tokens", type=int, default=256)
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="default: results/sequence_parallel_<model>_cpu.json")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--rank-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--P", type=int, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_worker:
        rank_step(args.model, int(args.tokens[0]), args.P, args.worker_out, args.warmup_tokens, args.seed)
        return 0
    args.out = args.out or RESULTS_DIR / f"sequence_parallel_{args.model}_cpu.json"
    import tempfile

    records, targets = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for t in sorted(set(parse_tokens(args.tokens))):
            base = None
            for P in sorted(args.ranks):
                ranks = launch(args.model, t, P, Path(tmp), args.warmup_tokens, args.seed, args.timeout)
                rec = {"tokens": t, "P": P, "peak_bytes": max(r["peak_bytes"] for r in ranks),
                       "host_bytes": max(r["host_bytes"] for r in ranks), "step_s": max(r["step_s"] for r in ranks),
                       "all_to_all_bytes": max(r["sent"]["all_to_all"] for r in ranks),
                       "state_bytes": max(r["sent"]["states"] + r["sent"]["halos"] for r in ranks),
                       "gradient_bytes": max(r["sent"]["gradients"] for r in ranks),
                       "compiles": max(r["compiles"] for r in ranks), "ulysses_sites": ranks[0]["ulysses"]}
                if P == 1:
                    base = rec
                else:
                    if base:
                        rec["peak_vs_one_process"] = rec["peak_bytes"] / base["peak_bytes"]
                        targets.append({"target": f"per-rank peak <= 1.3/{P} of one process at {token_label(t)}",
                                        "value": round(rec["peak_vs_one_process"], 3), "limit": round(1.3 / P, 3),
                                        "met": rec["peak_vs_one_process"] <= 1.3 / P})
                    rec["formula_bytes"] = formula_bytes(args.model, P)(t)
                    got = rec["state_bytes"] if args.model == "mamba" else rec["all_to_all_bytes"]
                    dev = got / rec["formula_bytes"] - 1
                    targets.append({"target": f"bytes sent within 10% of the formula (P={P}, {token_label(t)})",
                                    "value": round(dev, 4), "met": abs(dev) <= 0.10})
                records.append(rec)
                print(f"{token_label(t):>5} P={P}  peak/rank {fmt_bytes(rec['peak_bytes'])}  host {fmt_bytes(rec['host_bytes'])}"
                      f"  all-to-all {fmt_bytes(rec['all_to_all_bytes'])}  step {rec['step_s']:.1f} s", flush=True)
    for tg in targets:
        print(("MET     " if tg["met"] else "NOT MET ") + f"{tg['target']}: {tg['value']}")
    doc = {"benchmark": "sequence_parallel", "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                                         if k not in ("rank_worker", "P", "worker_out")}, "model": MODEL},
           "env": env_metadata(), "records": records, "targets": targets,
           "notes": ["peak_bytes: the largest per-rank device (here CPU) high-water mark of one step, host-pool buffers excluded.",
                     "all_to_all_bytes: what one rank sent to the others in one step (its own block excluded).",
                     "Ranks share this machine's cores: step times are relative figures only."]}
    path = write_results(args.out, doc)
    if not args.no_plot:
        fig, axes = new_figure(1, 1)
        series = {token_label(t): [(r["P"], r["peak_bytes"] / 2**20) for r in records if r["tokens"] == t] for t in sorted({r["tokens"] for r in records})}
        plot_series(axes[0][0], series, title="Llama step, per-rank device peak", xlabel="ranks P", ylabel="MiB")
        fig.savefig(Path(path).with_suffix(".png"), dpi=120)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
