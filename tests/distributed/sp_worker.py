"""One rank of a sequence-parallel test run (started by ``test_sequence_parallel.py`` with the
environment ``torchrun`` would set: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Runs a float64 training step of a tiny model with ``distributed={"sequence_parallel": P}`` on
the same full batch as every other rank, and the same step on one process without it (the
reference, computed by this rank alone), and writes what it found as JSON to ``--out``.
"""

import argparse
import copy
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import longctx_compiler as lc  # noqa: E402
from lm_helpers import ids_for  # noqa: E402
from longctx_compiler.testing import relative_error  # noqa: E402


class InlineLayersLM(torch.nn.Module):
    """A causal LM whose layers are written inline in its forward (no module per layer): the
    pipelined-layers pass finds no layer to pipeline, so each attention stays chunked over the
    rank's whole shard. Its attention is gpt-oss's eager spelling, with learned sinks. Its loss
    is transformers' convention under sequence parallelism: summed over ``shift_labels``,
    divided by ``num_items_in_batch``."""

    def __init__(self, vocab=64, hidden=32, heads=4, layers=2):
        super().__init__()
        self.heads = heads
        # gpt-oss's learned attention sinks: one logit per query head in each softmax
        self.sinks = torch.nn.ParameterList(torch.nn.Parameter(torch.randn(heads)) for _ in range(layers))
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(hidden, 3 * hidden) for _ in range(layers))
        self.out = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(layers))
        self.head = torch.nn.Linear(hidden, vocab, bias=False)

    def forward(self, input_ids, labels=None, shift_labels=None, num_items_in_batch=None, use_cache=None):
        h = self.embed(input_ids)
        B, T, C = h.shape
        for layer, (qkv, out) in enumerate(zip(self.qkv, self.out)):
            q, k, v = qkv(h).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
            # gpt-oss's eager spelling
            i = torch.arange(T)
            mask = torch.where(i[None, :] <= i[:, None], 0.0, float("-inf")).to(q.dtype)
            w = torch.matmul(q, k.transpose(2, 3)) * (C // self.heads) ** -0.5 + mask
            sinks = self.sinks[layer].reshape(1, -1, 1, 1).expand(B, -1, T, -1)
            logits = torch.cat([w, sinks], dim=-1)
            logits = logits - logits.max(dim=-1, keepdim=True).values
            a = torch.matmul(F.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1], v)
            a = a.transpose(1, 2).reshape(B, T, C)
            h = h + out(a)
        logits = self.head(h)
        if shift_labels is None and labels is not None:
            shift_labels = F.pad(labels[:, 1:], (0, 1), value=-100)
        loss = None
        if shift_labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), shift_labels.flatten(), reduction="sum")
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else (shift_labels != -100).sum())
        return {"loss": loss, "logits": logits}


def build(name):
    import transformers

    if name == "inline":
        torch.manual_seed(0)
        return InlineLayersLM()

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, vocab_size=64, max_position_embeddings=256)
    if name == "llama":  # GQA: 4 query heads, 2 key/value heads
        cfg = transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=2, **common)
        return transformers.LlamaForCausalLM(cfg)
    if name == "llama_mha":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common))
    if name == "mamba":
        cfg = transformers.MambaConfig(hidden_size=32, state_size=4, num_hidden_layers=2, vocab_size=64, expand=2, conv_kernel=4)
        return transformers.MambaForCausalLM(cfg)
    if name == "jamba":  # Mamba, attention, Mamba, attention (no RoPE, no experts)
        cfg = transformers.JambaConfig(
            hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=100, expert_layer_offset=99,
            num_experts=1, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4)
        return transformers.JambaForCausalLM(cfg)
    raise ValueError(name)


def f64_loss(model, ids, **extra):
    # transformers' own loss casts the logits to float32; the reference stays in float64
    logits = model(ids, use_cache=False, **extra)["logits"]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def packed_positions(spec):
    """``position_ids [B, T]`` restarting at every document (transformers' packed-sequence
    convention) from ``"6,2,5,3/3,10,3"``: one row per ``/``, its documents' lengths."""
    rows = [[int(n) for n in row.split(",")] for row in spec.split("/")]
    return torch.stack([torch.cat([torch.arange(n) for n in row]) for row in rows])


def step(opt, model, reference, ids, **extra):
    """One training step of ``opt`` (``model`` sequence-parallel) and of the float64 reference on
    the same batch: the losses and each gradient's relative error."""
    model.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    loss = opt(ids, labels=ids, use_cache=False, **extra)["loss"]
    loss.backward()
    want = f64_loss(reference, ids, **extra)
    want.backward()
    grads = {n: relative_error(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), reference.parameters())}
    return loss, want, grads


def run_packed(a):
    """Steps on packed documents with a model of its own (one compile): every spec of
    ``--packed``, against the same float64 model on one process."""
    out = {"steps": []}
    try:
        model = build(a.model).double().train()
        reference = copy.deepcopy(model)
        layers = {"enabled": True, "chunk_size": a.layers, "offload": a.offload} if a.layers else {}
        opt = lc.optimize(model, backend="aot_eager", strict=True, attention={"chunk_size": 4}, layers=layers,
                          distributed={"sequence_parallel": a.P})
        for i, spec in enumerate(a.packed):
            positions = packed_positions(spec)
            ids = ids_for(positions.shape[1], 100 + i, batch=positions.shape[0])
            loss, want, grads = step(opt, model, reference, ids, position_ids=positions)
            out["steps"].append({"T": positions.shape[1], "loss": float(loss), "loss_ref": float(want),
                                 "worst_grad": max(grads.values()), "worst_param": max(grads, key=grads.get),
                                 "vs_one_process": {}})
        out["compiles"] = opt.compile_count
        out["rewrites"] = [[r.pass_name, r.kind, r.site.split(" ")[0]] for r in opt.report.rewrites]
    except Exception as exc:  # reported to the test, which decides whether it was expected
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama")
    ap.add_argument("--P", type=int, required=True)
    ap.add_argument("--lengths", type=int, nargs="*", default=[13])
    ap.add_argument("--packed", nargs="*", default=[],
                    help="then steps on packed documents (a model of its own), e.g. 6,2,5,3/3,10,3: per row, the documents' lengths")
    ap.add_argument("--different-batches", action="store_true")
    ap.add_argument("--vs-one-process", action="store_true", help="also compare with the same rewrites on one process")
    ap.add_argument("--layers", type=int, default=0, help="sequence-pipelined layers with this chunk (0: off)")
    ap.add_argument("--offload", action="store_true", help="pipelined layers keep their inputs in the host pool")
    ap.add_argument("--fsdp", action="store_true", help="fully shard the model (FSDP2) before optimizing it")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = {"rank": rank, "steps": []}
    try:
        model = build(a.model).double().train()
        reference = copy.deepcopy(model)
        # The same rewrites on one process: the sharding itself compared, when transformers'
        # own computation rounds to float32 somewhere (Mamba's scan) and eager is not exact.
        one_process = lc.optimize(copy.deepcopy(model), backend="aot_eager", strict=True, attention={"chunk_size": 4},
                                  ssm={"shard_blocks": False, "recompute_blocks": False}) if a.vs_one_process else None
        if a.fsdp:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
        layers = {"enabled": True, "chunk_size": a.layers, "offload": a.offload} if a.layers else {}
        opt = lc.optimize(model, backend="aot_eager", strict=True, attention={"chunk_size": 4}, layers=layers,
                          distributed={"sequence_parallel": a.P})
        for t in a.lengths:
            ids = ids_for(t, t + (rank if a.different_batches else 0))
            loss, want, grads = step(opt, model, reference, ids)
            vs_one = {}
            if one_process is not None:
                one_process.zero_grad(set_to_none=True)
                one_process(ids, labels=ids, use_cache=False)["loss"].backward()
                vs_one = {n: relative_error(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), one_process.parameters())}
            result["steps"].append({"T": t, "loss": float(loss), "loss_ref": float(want), "loss_dtype": str(loss.dtype),
                                    "worst_grad": max(grads.values()), "worst_param": max(grads, key=grads.get),
                                    "vs_one_process": vs_one})
        result["compiles"] = opt.compile_count
        result["rewrites"] = [[r.pass_name, r.kind, r.site.split(" ")[0]] for r in opt.report.rewrites]
        if a.packed:
            result["packed"] = run_packed(a)
    except Exception as exc:  # reported to the test, which decides whether it was expected
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    with open(a.out, "w") as f:
        json.dump(result, f)
    # every rank done with every collective before the group goes (gloo aborts the process
    # when it is torn down under a peer still sending)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
