"""Train a small Llama-style model on long synthetic sequences with longctx_compiler.

Runs on a CPU out of the box (no downloads: the model is built from a ``transformers``
config with random weights, the data is generated). It

1. builds the model and a built-in long-sequence task: a block of tokens drawn from a
   Zipf-like distribution, repeated along the sequence (the model first learns the token
   frequencies — the loss falls to their entropy within a few steps — and only attending a
   whole block back takes it below that),
2. optimizes it with every decoder layer pipelined along the sequence (each layer runs one
   chunk of tokens at a time; its input and K/V history wait in the host pool) and the LM
   loss tiled (training returns ``logits=None``),
3. measures one training step's device peak of plain PyTorch and of the optimized model,
4. trains a few steps with a progress bar,
5. prints the rewrite report and writes its drawing (DOT, and SVG when Graphviz is present).

The default backend is ``aot_eager``: on a CPU, Inductor's compile of the pipelined layers
takes minutes and buys little; ``--backend inductor`` uses it.

    python examples/train_long_context.py                       # defaults
    python examples/train_long_context.py --seq-len 16384 --steps 20
    python examples/train_long_context.py --no-pipeline         # attention + loss only
    torchrun --nproc-per-node 2 examples/train_long_context.py --sequence-parallel 2

With ``--sequence-parallel P`` (launched by ``torchrun`` with P processes, gloo on CPU and
NCCL on GPU) every rank holds ``1/P`` of each sequence and attention exchanges heads for
sequence (Ulysses); the layers are not pipelined then (the two do not compose yet). Every rank
trains on the same batches; rank 0 prints.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import torch
from tqdm import tqdm

import longctx_compiler as lc
from longctx_compiler.memory import measure_step
from longctx_compiler.viz import render


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 2,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,  # grouped-query attention, as in Llama 3
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq_len, 2048),
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def token_distribution(vocab: int) -> torch.Tensor:
    """Zipf-like token frequencies ``p(k) ∝ 1/(k+1)`` (``[vocab]``), as in natural text."""
    p = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64)
    return p / p.sum()


def long_copy_batch(batch: int, seq_len: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """``[batch, seq_len]`` token ids: a random block that repeats, so after the first block
    every token is predictable by looking a whole block back (a long-range dependency)."""
    block = max(seq_len // 4, 1)
    pattern = torch.multinomial(token_distribution(vocab), batch * block, replacement=True, generator=generator).view(batch, block)
    reps = -(-seq_len // block)
    return pattern.repeat(1, reps)[:, :seq_len]


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    optimizer.zero_grad(set_to_none=True)
    loss = model(ids, labels=ids).loss
    loss.backward()
    optimizer.step()
    return loss.item()


def _seconds(step) -> float:
    t0 = time.perf_counter()
    step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default: %(default)s)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per layer and attention chunk")
    p.add_argument("--no-pipeline", dest="pipeline", action="store_false",
                   help="chunk the attention and tile the loss only (the default configuration)")
    p.add_argument("--no-offload", dest="offload", action="store_false",
                   help="keep layer inputs and K/V on the device between forward and backward (default: host pool)")
    p.add_argument("--backend", default="aot_eager", choices=lc.config.BACKENDS)
    p.add_argument("--out", default="out/demo", help="path prefix for the drawing and the JSON summary")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sequence-parallel", type=int, default=1, metavar="P",
                   help="shard each sequence over P ranks (launch with torchrun --nproc-per-node P)")
    args = p.parse_args(argv)
    sp = args.sequence_parallel
    if sp > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        args.pipeline = False
    lead = sp <= 1 or torch.distributed.get_rank() == 0
    say = print if lead else (lambda *a, **k: None)  # rank 0 speaks for the group
    # The compiler reports its progress (each graph compiled, how long, what it rewrote)
    # through the "longctx_compiler" logger; show it, the first compile takes a while.
    logging.basicConfig(format="  [%(name)s] %(message)s")
    logging.getLogger("longctx_compiler").setLevel(logging.INFO)

    gen = torch.Generator().manual_seed(args.seed)
    model = build_model(args)
    eager_model = copy.deepcopy(model)
    optimized = lc.optimize(model, backend=args.backend, attention={"chunk_size": args.chunk_size, "offload": args.offload},
                            layers={"enabled": args.pipeline, "chunk_size": args.chunk_size, "offload": args.offload},
                            distributed={"sequence_parallel": sp if sp > 1 else None})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    say(f"model: Llama-style, {args.layers} layers, hidden {args.hidden}, GQA 8/2 heads; sequence {args.seq_len} tokens x batch {args.batch}"
          + (f"; sharded over {sp} ranks ({-(-args.seq_len // sp)} tokens each)" if sp > 1 else ""))
    ids = long_copy_batch(args.batch, args.seq_len, args.vocab, gen)

    # Compile (first call) outside the measurement, then measure one step of each.
    say(f"compiling with the {args.backend} backend (first call)...")
    t0 = time.perf_counter()
    optimized(ids, labels=ids).loss.backward()
    compile_s = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)

    def eager_step():
        eager_model(ids, labels=ids).loss.backward()

    def ours_step():
        optimized(ids, labels=ids).loss.backward()

    eager_mem = measure_step(eager_step, parameters=eager_model)
    ours_mem = measure_step(ours_step, parameters=model)
    eager_s, ours_s = _seconds(eager_step), _seconds(ours_step)
    eager_model.zero_grad(set_to_none=True)
    model.zero_grad(set_to_none=True)

    losses = []
    t0 = time.perf_counter()
    for _ in tqdm(range(args.steps), desc="training", unit="step", disable=not lead):
        batch = long_copy_batch(args.batch, args.seq_len, args.vocab, gen)
        losses.append(train_step(optimized, optimizer, batch))
    train_s = time.perf_counter() - t0

    say()
    say(optimized.report)
    say()
    ratio = eager_mem.saved_for_backward_bytes / max(ours_mem.saved_for_backward_bytes, 1)
    peak_ratio = eager_mem.peak_bytes / max(ours_mem.peak_bytes, 1)
    say(f"plain PyTorch : {eager_mem}")
    say(f"optimized     : {ours_mem}")
    say(f"device peak of one training step: plain {eager_mem.peak_bytes / 2**20:.1f} MiB, optimized{' (per rank)' if sp > 1 else ''} "
          f"{ours_mem.peak_bytes / 2**20:.1f} MiB -> {peak_ratio:.1f}x less "
          f"(+ {ours_mem.host_pool_peak_bytes / 2**20:.1f} MiB in the host pool)")
    say(f"step time (forward + backward): plain {eager_s:.2f} s, optimized {ours_s:.2f} s ({ours_s / eager_s:.2f}x)")
    p_tok = token_distribution(args.vocab)
    entropy = float(-(p_tok * p_tok.log()).sum())
    say(f"compile {compile_s:.1f} s; {args.steps} steps in {train_s:.1f} s")
    say(f"loss {losses[0]:.3f} -> {losses[-1]:.3f} (uniform guess {torch.log(torch.tensor(float(args.vocab))):.3f}; "
          f"token-frequency entropy {entropy:.3f}; below it the model copies from a block back)")

    if not lead:
        return {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    files = render(optimized.report, out)
    summary = {
        "seq_len": args.seq_len,
        "chunk_size": args.chunk_size,
        "offload": args.offload,
        "pipeline": args.pipeline,
        "sequence_parallel": sp,
        "backend": args.backend,
        "memory": {"eager": eager_mem.to_json(), "optimized": ours_mem.to_json(), "saved_bytes_ratio": ratio,
                   "peak_ratio": peak_ratio},
        "step_seconds": {"eager": eager_s, "optimized": ours_s},
        "losses": losses,
        "report": optimized.report.to_json(),
    }
    summary_path = Path(f"{out}.json")
    summary_path.write_text(json.dumps(summary, indent=2))
    for f in files + [summary_path]:
        say(f"wrote {f}")
    return summary


if __name__ == "__main__":
    main()
