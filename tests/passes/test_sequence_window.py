"""Which blocks run chunk by chunk along the sequence: the sequence-window analysis, end to end.

``adjoint_sharded_blocks`` rewrites a block (the outermost module holding exactly one scan)
to run chunk by chunk only when ``passes/analysis/sequence_window.py`` proves it local along the
sequence: causal, with a finite halo H (the tokens before a chunk that its window reads),
and its outputs pointwise in the scan's output. Proved here through ``lc.optimize``, in
float64, on stacks of two small blocks run in chunks of Q = 3 tokens:

* local blocks (causal depthwise convolutions, one or two stacked; token shifts and delays;
  a convolution on the gate beside the scan), around norms over features, the SiLU gate
  after the scan, a residual, transposes, a per-head reshape and channel chunk/split, are
  rewritten with exactly the halo their sequence ops add up to (a halo wider than a chunk
  included), and the loss and every gradient (input and parameters) equal eager for lengths
  below, at, above and not multiples of Q, all from one compile;
* non-local blocks (look-ahead; a slice that drops real tokens and pads back; a mean,
  ``cumsum``, ``flip`` or ``roll`` along the sequence; the length used as a value; a
  post-scan op mixing the scan's output across positions; a truncated adjoint) are refused
  with the reason, the block beside them is still chunked, and ``recompute_ssm_blocks``
  takes them, with the same exact gradients.

The tests at the end pin bugs found and fixed (see their docstrings).
"""

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import longctx_compiler as lc
from longctx_compiler.nn import selective_scan_fn
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, make_tensor

PASS = "adjoint_sharded_blocks"
FALLBACK = "recompute_ssm_blocks"
D_MODEL, D, N = 8, 8, 3  # model width, scan channels, state size
Q = 3  # tokens per block chunk
LENGTHS = (2, Q, 2 * Q + 1, 13)  # below, at, above and not a multiple of Q (T = 1: its own test)
F64 = {"dtype": torch.float64}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # Tiny float64 tensors: a second thread only adds hand-off latency (tenfold on a busy machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- ops along the sequence: (block, [B, T, D]) -> [B, T, D] -----------------------------
def identity(block, h):
    return h


def causal_convs(block, h):
    """The block's depthwise convolutions in turn, each made causal by dropping its right padding."""
    t = h.shape[1]
    h = h.transpose(1, 2)
    for conv in block.convs:
        h = conv(h)[..., :t]
    return h.transpose(1, 2)


def token_shift(block, h):
    """RWKV's token shift: each token mixed with the one before it."""
    previous = F.pad(h, (0, 0, 1, 0))[:, : h.shape[1]]
    return h + block.mu * (previous - h)


def shift_by_negative_pad(block, h):
    return F.pad(h, (0, 0, 1, -1))


def delay_by_2(block, h):
    return F.pad(h[:, :-2], (0, 0, 2, 0))


def shift_then_convs(block, h):
    return causal_convs(block, token_shift(block, h))


def look_ahead(block, h):
    return F.pad(h[:, 1:], (0, 0, 0, 1))


def drop_last_2_and_pad_back(block, h):
    return F.pad(h[:, : h.shape[1] - 2], (0, 0, 0, 2))


def centre_over_sequence(block, h):
    return h - h.mean(dim=1, keepdim=True)


def cumsum(block, h):
    return h.cumsum(dim=1)


def flip(block, h):
    return h.flip(1)


def roll(block, h):
    """A token shift that wraps the last token around to the first position."""
    return torch.roll(h, 1, dims=1)


def times_length(block, h):
    return h * h.shape[1]


def plus_positions(block, h):
    return h + 0.1 * torch.arange(h.shape[1], **F64)[:, None]


# -- the model ---------------------------------------------------------------------------
class Block(nn.Module):
    """x → RMSNorm → in_proj → chunk (u, z) → SiLU(mix(u)) → x_proj → split (Δ, B, C) → scan → y;
    post(y) · SiLU(gate(z)) → per-head LayerNorm → out_proj → + x.

    ``mix``, ``gate`` and ``post`` are the sequence ops under test, before, beside and after
    the scan; ``convs`` the kernel sizes of the depthwise convolutions they may use."""

    def __init__(self, mix=identity, gate=identity, post=identity, convs=()):
        super().__init__()
        self.mix, self.gate, self.post = mix, gate, post
        self.norm = nn.RMSNorm(D_MODEL, **F64)
        self.in_proj = nn.Linear(D_MODEL, 2 * D, **F64)
        self.convs = nn.ModuleList(nn.Conv1d(D, D, k, groups=D, padding=k - 1, **F64) for k in convs)
        self.mu = nn.Parameter(torch.rand(D, **F64))
        self.x_proj = nn.Linear(D, D + 2 * N, **F64)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, **F64).repeat(D, 1)))
        self.D = nn.Parameter(torch.randn(D, **F64))
        self.dt_bias = nn.Parameter(torch.randn(D, **F64))
        self.head_norm = nn.LayerNorm(D // 2, **F64)
        self.out_proj = nn.Linear(D, D_MODEL, **F64)

    def forward(self, x):
        u, z = self.in_proj(self.norm(x)).chunk(2, dim=-1)
        u = F.silu(self.mix(self, u))
        dt, B, C = self.x_proj(u).split([D, N, N], dim=-1)
        y = selective_scan_fn(
            u.transpose(1, 2), dt.transpose(1, 2), -torch.exp(self.A_log), B.transpose(1, 2), C.transpose(1, 2),
            D=self.D, delta_bias=self.dt_bias, delta_softplus=True,
        )
        y = self.post(self, y.transpose(1, 2)) * F.silu(self.gate(self, z))
        return x + self.out_proj(self.merge_heads(self.head_norm(self.split_heads(y))))

    def split_heads(self, y):  # [B, T, D] -> [B, T, 2, D/2]: a reshape to the length T
        b, t, _ = y.shape
        return y.reshape(b, t, 2, D // 2)

    def merge_heads(self, y):
        b, t, _, _ = y.shape
        return y.reshape(b, t, D)


class Stack(nn.Module):
    def __init__(self, *blocks):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def optimized(model, **ssm):
    return lc.optimize(model, backend="aot_eager", strict=True, ssm={"chunk_size": 4, "block_chunk_size": Q, **ssm})


def twins(*blocks, seed=0, **ssm):
    """``Stack(Block(**b) for b in blocks)``, as (eager, optimized) copies with equal weights."""
    torch.manual_seed(seed)
    eager = Stack(*(Block(**b) for b in blocks))
    return eager, optimized(copy.deepcopy(eager), **ssm)


def tokens(t, seed, batch=2):
    return make_tensor((batch, t, D_MODEL), seed=seed, requires_grad=True)


def assert_exact(eager, opt, lengths=LENGTHS):
    """Loss and every gradient equal eager at every length, all from one compile."""
    for t in lengths:
        assert_gradients_match(eager, opt, [tokens(t, seed=t)], rtol=EXACT_RTOL)
    assert opt.compile_count == 1


def rewrites(opt, pass_name=PASS):
    """Block path → the rewrite's details, for one pass."""
    return {r.site.split(" ")[0]: r.details for r in opt.report.rewrites if r.pass_name == pass_name}


def refusals(opt):
    """Block path → why the chunking pass left it."""
    return {r.site.split(" ")[0]: r.reason for r in opt.report.refusals if r.pass_name == PASS}


# -- the blocks, and what the analysis must say about each ---------------------------------
@dataclass(frozen=True)
class Case:
    block: dict = field(default_factory=dict)  # Block(**block)
    halo: int | None = None  # local: the halo the rewrite must report
    reason: str | None = None  # non-local: a substring of the refusal


CASES = {
    # local
    "features-only": Case(halo=0),
    "conv-k2": Case({"mix": causal_convs, "convs": (2,)}, halo=1),
    "conv-k4": Case({"mix": causal_convs, "convs": (4,)}, halo=3),
    "two-convs": Case({"mix": causal_convs, "convs": (3, 4)}, halo=2 + 3),  # > Q: two chunks back
    "token-shift": Case({"mix": token_shift}, halo=1),
    "negative-pad-shift": Case({"mix": shift_by_negative_pad}, halo=1),
    "delay-by-2": Case({"mix": delay_by_2}, halo=2),
    "shift-then-conv": Case({"mix": shift_then_convs, "convs": (4,)}, halo=1 + 3),
    "conv-on-gate": Case({"gate": causal_convs, "convs": (4,)}, halo=3),  # reached by the outputs only
    # non-local
    "look-ahead": Case({"mix": look_ahead}, reason="look up to 1 tokens ahead"),
    "drop-and-pad-back": Case({"mix": drop_last_2_and_pad_back}, reason="look up to 2 tokens ahead"),
    "mean-over-sequence": Case({"mix": centre_over_sequence}, reason="(mean) reduces or leaves the sequence dim"),
    "cumsum": Case({"mix": cumsum}, reason="(cumsum) works along the sequence dim"),
    "flip": Case({"mix": flip}, reason="(flip) has no sequence-window rule"),
    "roll": Case({"mix": roll}, reason="(roll) has no sequence-window rule"),
    "length-as-value": Case({"mix": times_length}, reason="(mul) uses the sequence length as a value"),
    "arange-positions": Case({"mix": plus_positions}, reason="(arange) uses the sequence length as a value"),
    "conv-after-scan": Case({"post": causal_convs, "convs": (2,)}, reason="mixes the scan's output across positions (it reads 1 earlier"),
}


def check_blocks(names, lengths):
    """Stack the named blocks; each local one is chunked with its halo, each other refused
    with its reason and recomputed instead; loss and gradients equal eager throughout."""
    eager, opt = twins(*(CASES[n].block for n in names))
    assert_exact(eager, opt, lengths)
    done, why, fallback = rewrites(opt), refusals(opt), rewrites(opt, FALLBACK)
    for i, name in enumerate(names):
        site, case = f"blocks.{i}", CASES[name]
        if case.halo is not None:
            assert site in done and done[site]["halo"] == case.halo, (name, done, why)
            assert done[site]["chunk_size"] == Q and site not in why
        else:
            assert site in why and case.reason in why[site], (name, why)
            assert site not in done and site in fallback, (name, done, fallback)
    assert opt.report.count(PASS) == sum(CASES[n].halo is not None for n in names)


@pytest.mark.parametrize("names", [
    ("features-only", "conv-k2"),
    ("conv-k4", "token-shift"),
    ("two-convs", "delay-by-2"),
    ("shift-then-conv", "negative-pad-shift"),
    ("conv-on-gate", "conv-on-gate"),
], ids="+".join)
def test_local_blocks_are_chunked_with_their_halo_and_exact_gradients(names):
    check_blocks(names, LENGTHS)


@pytest.mark.parametrize("names", [
    ("look-ahead", "conv-k4"),  # the local block beside a refused one is still chunked
    ("conv-k2", "conv-after-scan"),
    ("drop-and-pad-back", "mean-over-sequence"),
    ("cumsum", "flip"),
    ("roll", "length-as-value"),
    ("arange-positions", "token-shift"),
], ids="+".join)
def test_non_local_blocks_are_refused_with_the_reason_and_fall_back_exactly(names):
    # T >= Q + 1: a slice 0 or 1 tokens long (T = 2, 3 here) would be a Dynamo specialisation.
    check_blocks(names, (Q + 1, 2 * Q + 1, 13))


def test_any_length_with_a_halo_of_two_whole_chunks():
    block = {"mix": shift_then_convs, "convs": (3, 4)}  # H = 1 + 2 + 3 = 2Q
    eager, opt = twins(block, block)

    @settings(max_examples=10, deadline=None)
    @given(t=st.integers(2, 24), seed=st.integers(0, 2**16))
    def prop(t, seed):
        assert_gradients_match(eager, opt, [tokens(t, seed)], rtol=EXACT_RTOL)

    prop()
    assert opt.compile_count == 1
    assert {site: d["halo"] for site, d in rewrites(opt).items()} == {"blocks.0": 2 * Q, "blocks.1": 2 * Q}


def test_a_single_token_gets_its_own_graph_and_stays_exact():
    # Dynamo specialises a size of 1: T = 1 compiles a second graph with a static length,
    # which has nothing to chunk (refused for that reason) and falls back, exactly.
    eager, opt = twins(CASES["conv-k4"].block, CASES["token-shift"].block)
    assert_exact(eager, opt, lengths=(5,))
    assert_gradients_match(eager, opt, [tokens(1, seed=1)], rtol=EXACT_RTOL)
    why = refusals(opt)
    assert list(why) == ["blocks.0", "blocks.1"] and all("not a symbol" in r for r in why.values()), why
    assert opt.report.count(FALLBACK) == 2


def test_a_truncated_adjoint_is_not_chunked_across_the_block():
    block = CASES["conv-k4"].block
    eager, opt = twins(block, block, mode="truncated", window=3)
    x = tokens(2 * Q + 1, seed=0)
    torch.testing.assert_close(opt(x), eager(x), rtol=EXACT_RTOL, atol=0)  # only the backward is truncated
    why = refusals(opt)
    assert list(why) == ["blocks.0", "blocks.1"] and all("truncated" in r for r in why.values()), why
    assert opt.report.count(PASS) == 0 and opt.report.count(FALLBACK) == 2


# -- regressions ---------------------------------------------------------------------------
class LengthFreeBlock(Block):
    """The same block reading no size at all: heads split by unflatten/flatten, not to T."""

    def split_heads(self, y):
        return y.unflatten(-1, (2, D // 2))

    def merge_heads(self, y):
        return y.flatten(-2)


def test_a_block_that_never_reads_the_length():
    """The op's backward once returned None for its empty list of sizes (torch.library wants [])."""
    torch.manual_seed(0)
    eager = Stack(*(LengthFreeBlock(mix=shift_by_negative_pad) for _ in range(2)))
    opt = optimized(copy.deepcopy(eager))
    assert_exact(eager, opt, lengths=(2 * Q + 1,))
    assert opt.report.count(PASS) == 2


def test_a_block_chunk_shorter_than_a_delay():
    """``x[:, :-2]`` on a 1-token window once clamped to an empty slice (silently wrong without
    this block's reshape): windows are now at least as long as every ``T + c`` needs."""
    block = CASES["delay-by-2"].block
    eager, opt = twins(block, block, block_chunk_size=1)
    assert_exact(eager, opt, lengths=(2 * Q + 1,))  # chunked or refused, but exact


class Backbone(nn.Module):
    """The blocks inside a module of their own that is called, as in Hugging Face models."""

    def __init__(self, *blocks):
        super().__init__()
        self.backbone = Stack(*blocks)

    def forward(self, x):
        return self.backbone(x)


def test_the_fallback_takes_a_refused_block_inside_a_backbone():
    """The fallback once saw the refused block's scan as the only one left in ``backbone`` (the
    chunked blocks' scans are inside their ops) and took the whole backbone as its block."""
    torch.manual_seed(0)
    eager = Backbone(Block(**CASES["look-ahead"].block), Block(**CASES["conv-k4"].block))
    opt = optimized(copy.deepcopy(eager))
    assert_exact(eager, opt, lengths=(2 * Q + 1,))
    assert list(rewrites(opt)) == ["backbone.blocks.1"]
    assert list(rewrites(opt, FALLBACK)) == ["backbone.blocks.0"]


def delay_by_2_from_the_length(block, h):
    return F.pad(h[:, : h.shape[1] - 2], (0, 0, 2, 0))


def test_size_arithmetic_shared_between_blocks_stays_outside_them():
    """Dynamo computes ``T - 2`` once, in the first block, and reuses it in the second: it once
    left the first block as a size, which refused it from both passes."""
    torch.manual_seed(0)
    eager = Stack(*(Block(mix=delay_by_2_from_the_length) for _ in range(2)))
    opt = optimized(copy.deepcopy(eager))
    assert_exact(eager, opt, lengths=(2 * Q + 1, 13))
    assert opt.report.count(PASS) == 2 and not refusals(opt)
