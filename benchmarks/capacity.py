"""On paper: the longest sequence one training step fits in, per GPU, under sequence parallelism.

Not a benchmark: formulas for per-rank memory, with the coefficients that depend on our
implementation read from measured benchmark results (``results/layers_cpu.json`` and
``results/sequence_parallel_mamba_cpu.json``), applied to Llama-3-8B and a Mamba-2.8B-shaped
model on ``P`` = 4 and 8 GPUs of 80 GB and 141 GB. Writes ``results/capacity.json`` and a
Markdown table (``results/capacity.md``).

Per rank (``L = T / P`` tokens of the sequence; bf16 weights and activations, ``b = 2``):

* **static** ``16 · N / P`` bytes: bf16 weights and gradients, fp32 master weights and two
  AdamW moments, sharded over the ``P`` ranks (ZeRO-3 / FSDP over the sequence-parallel
  ranks — see "assumptions" in the JSON: not supported by our wrapper yet, FSDP's hooks
  would split the one graph each rank compiles). Replicated, it is ``16 · N``.
* **Llama** (pipelined layers, host-pool offload, Ulysses per chunk):
  device ``α · L · h · b + W``: ``α`` whole-sequence ``[L, h]`` tensors live at the peak
  (the slope of the layers benchmark's device peak over T, in units of ``h`` elements),
  ``W`` one chunk's working set: the loss's two tiles (``2 · 2^22`` fp32 logits) and a layer
  chunk's activations with their gradients, ``2 · Q · (6h + 3i) · b`` (q, k, v, attention
  output, two norms; MLP gate, up, product — an estimate, the benchmark's chunk term is too
  small on CPU to fit it). Host ``layers · (L·h·b + 2·T·(H'/P)·d·b) + L·h·b + 2·T·(H'/P)·d·4``:
  each layer's input and K/V history of this rank's heads (``H' = max(H_kv, P)``, KV heads
  replicated up to ``P``), the final norm's input, one layer's fp32 ``dK, dV`` accumulators.
* **Mamba** (time-sharded scans; SSM blocks are not chunked under sequence parallelism yet):
  device ``γ · layers · L · d_model · b + W``: ``γ`` measured the same way from the
  sequence-parallel Mamba benchmark (per-rank peak between ``P = 2`` and ``P = 4``).
  No host tier.

The usable device memory is 90 % of the nominal (allocator fragmentation, communication
buffers, the CUDA context).

Run: ``python -m benchmarks.capacity``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR

LLAMA3_8B = dict(name="Llama-3-8B", layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256)
MAMBA_2_8B = dict(name="Mamba-2.8B", layers=64, hidden=2560, expand=2, state=16, conv=4, vocab=50280)
GPUS = {"80 GB": 80e9, "141 GB": 141e9}
RANKS = (4, 8)
USABLE = 0.9
#: Host memory per GPU for the host-bounded column: 2 TB shared by a node's 8 GPUs.
HOST_PER_RANK = 256e9
BF16 = 2
#: Tokens per layer chunk on a GPU.
CHUNK = 4096
#: The tiled loss's two live tiles: 2^22 fp32 logits each (``MAX_AUTO_TILE``).
LOSS_TILES = 2 * 2**22 * 4


def llama_params(m: dict[str, int]) -> int:
    h, d = m["hidden"], m["head_dim"]
    attn = h * m["heads"] * d * 2 + h * m["kv_heads"] * d * 2
    return 2 * m["vocab"] * h + m["layers"] * (attn + 3 * h * m["intermediate"] + 2 * h) + h


def mamba_params(m: dict[str, int]) -> int:
    h, di, n = m["hidden"], m["expand"] * m["hidden"], m["state"]
    rank = -(-h // 16)
    layer = h * 2 * di + di * m["conv"] + di + di * (rank + 2 * n) + rank * di + di + di * n + di + di * h + h
    return m["vocab"] * h + m["layers"] * layer + h


def _slope(points: list[tuple[float, float]]) -> float:
    (x0, y0), (x1, y1) = points[0], points[-1]
    return (y1 - y0) / (x1 - x0)


def measured_coefficients(results: Path) -> dict[str, Any]:
    """``α`` and ``γ`` (whole-sequence tensors per token, in units of the model's width in
    its own dtype) from the benchmark results, with where they came from."""
    layers = json.loads((results / "layers_cpu.json").read_text())
    cfg = layers["config"]
    ours = sorted((r["tokens"], r["peak_bytes"]) for r in layers["records"] if r["method"] == "ours" and r["status"] == "ok")
    alpha = _slope(ours) / (cfg["hidden"] * 4)  # float32 run
    host = max(r["host_bytes"] / r["tokens"] for r in layers["records"] if r["method"] == "ours" and r["status"] == "ok")
    mamba = json.loads((results / "sequence_parallel_mamba_cpu.json").read_text())
    per_rank = sorted((r["tokens"] / r["P"], r["peak_bytes"]) for r in mamba["records"] if r["P"] > 1)
    from benchmarks.bench_sequence_parallel import MAMBA

    gamma = _slope(per_rank) / (MAMBA["layers"] * MAMBA["hidden"] * 4)
    kv_dim = cfg["kv_heads"] * cfg["head_dim"]
    host_formula = cfg["layers"] * (cfg["hidden"] + 2 * kv_dim) * 4 + cfg["hidden"] * 4 + 2 * kv_dim * 4
    return {
        "alpha": alpha, "gamma": gamma,
        "alpha_source": f"layers_cpu.json: ours' device peak {ours[0][1]} B at T={ours[0][0]} -> {ours[-1][1]} B at T={ours[-1][0]}",
        "gamma_source": f"sequence_parallel_mamba_cpu.json: per-rank peak over local tokens {per_rank}",
        "host_check": {"measured_bytes_per_token": host, "formula_bytes_per_token": host_formula},
    }


def llama_rank(m: dict[str, int], P: int, T: float, alpha: float) -> dict[str, float]:
    h, i, d = m["hidden"], m["intermediate"], m["head_dim"]
    L = T / P
    kv_heads = max(m["kv_heads"], P) / P
    work = LOSS_TILES + 2 * CHUNK * (6 * h + 3 * i) * BF16
    device = alpha * L * h * BF16 + work
    host = m["layers"] * (L * h * BF16 + 2 * T * kv_heads * d * BF16) + L * h * BF16 + 2 * T * kv_heads * d * 4
    return {"device": device, "work": work, "host": host}


def mamba_rank(m: dict[str, int], P: int, T: float, gamma: float) -> dict[str, float]:
    work = LOSS_TILES
    return {"device": gamma * m["layers"] * (T / P) * m["hidden"] * BF16 + work, "work": work, "host": 0.0}


def largest_t(per_rank, static: float, budget: float, tier: str = "device") -> int:
    """The largest ``T`` (a multiple of 1024) whose per-rank bytes on ``tier`` fit ``budget``
    (every term is linear in ``T``)."""
    free = budget - static - per_rank(0.0)[tier]
    slope = per_rank(1.0)[tier] - per_rank(0.0)[tier]
    if free <= 0:
        return 0
    return int(free / slope) // 1024 * 1024 if slope > 0 else 2**62


def table(coeffs: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for model, params, rank_fn, coeff in ((LLAMA3_8B, llama_params(LLAMA3_8B), llama_rank, coeffs["alpha"]),
                                          (MAMBA_2_8B, mamba_params(MAMBA_2_8B), mamba_rank, coeffs["gamma"])):
        for gpu, nominal in GPUS.items():
            for P in RANKS:
                static = 16 * params / P
                per_rank = lambda T, P=P: rank_fn(model, P, T, coeff)  # noqa: E731
                T = largest_t(per_rank, static, USABLE * nominal)
                used = per_rank(float(T))
                replicated = largest_t(per_rank, 16 * params, USABLE * nominal)
                host_bound = min(T, largest_t(per_rank, 0.0, HOST_PER_RANK, "host"))
                rows.append({
                    "model": model["name"], "params": params, "gpu": gpu, "P": P, "largest_T": T,
                    "largest_T_weights_replicated": replicated, "largest_T_host_256GB": host_bound,
                    "static_bytes": static, "activation_bytes": used["device"] - used["work"], "work_bytes": used["work"],
                    "host_bytes_per_rank": used["host"],
                })
    return rows


def _tokens(t: int) -> str:
    return "does not fit" if t <= 0 else (f"{t / 2**20:.2f}M" if t >= 2**20 else f"{t // 1024}K")


def markdown(rows: list[dict[str, Any]], coeffs: dict[str, Any]) -> str:
    lines = [
        "| model | GPU | P | largest T (weights sharded) | host / rank there | with 256 GB host / rank | weights replicated | static / rank |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['gpu']} | {r['P']} | {_tokens(r['largest_T'])} | {r['host_bytes_per_rank'] / 1e9:.0f} GB "
                     f"| {_tokens(r['largest_T_host_256GB'])} | {_tokens(r['largest_T_weights_replicated'])} | {r['static_bytes'] / 1e9:.1f} GB |")
    lines.append("")
    lines.append(f"α = {coeffs['alpha']:.2f} whole-sequence [L, hidden] tensors per token (Llama, pipelined layers); "
                 f"γ = {coeffs['gamma']:.1f} [L, d_model] tensors per token and layer (Mamba, blocks not chunked under "
                 "sequence parallelism). Usable device memory 90 % of nominal; bf16; AdamW.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR, help="where the measured benchmark results are")
    p.add_argument("--out", type=Path, default=RESULTS_DIR / "capacity.json")
    args = p.parse_args(argv)
    coeffs = measured_coefficients(args.results)
    rows = table(coeffs)
    out = {
        "assumptions": [
            "bf16 weights and activations, AdamW (16 bytes per parameter: bf16 weight and gradient, fp32 master and two moments)",
            "largest_T: weights, gradients and optimizer states sharded over the P sequence-parallel ranks (ZeRO-3/FSDP); "
            "not supported by our wrapper yet (FSDP's hooks would split the one graph each rank compiles; it is refused)",
            "largest_T_weights_replicated: what runs today (every rank holds all 16 bytes per parameter)",
            f"usable device memory {USABLE:.0%} of nominal; layer chunk Q = {CHUNK}",
            f"largest_T_host_256GB: also bounded by {HOST_PER_RANK / 1e9:.0f} GB of host memory per rank (2 TB per 8-GPU node)",
            "Mamba: time-sharded scans, SSM blocks not chunked under sequence parallelism (today's behaviour)",
        ],
        "coefficients": coeffs, "models": {"llama": LLAMA3_8B, "mamba": MAMBA_2_8B}, "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    md = markdown(rows, coeffs)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
