"""Typed configuration: frozen dataclasses with defaults, validated on construction.

One :class:`Config` per ``optimize`` call, with one sub-config per capability::

    Config(attention=AttentionConfig(chunk_size=4096, offload=True),
           ssm=SSMConfig(chunk_size=256, mode="exact"),
           backend="inductor", strict=False)

Every field is checked when the object is built, so a typo or a bad value fails at the call
site with a message that says what is allowed, never later inside a compiled graph.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["AttentionConfig", "SSMConfig", "LMLossConfig", "LayerConfig", "DistributedConfig", "Config", "BACKENDS"]

#: Backends ``optimize`` can hand the rewritten graph to.
#: ``"inductor"`` generates code (Triton on GPU, C++ on CPU); ``"aot_eager"`` runs the same
#: passes and the same AOTAutograd forward/backward split without code generation, which is
#: fast to compile and exact to run (used by most tests).
BACKENDS = ("inductor", "aot_eager")


def _check_positive_int(owner: str, name: str, value: Any, *, allow_none: bool = False, unit: str = "tokens") -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}.{name} must be an int, got {type(value).__name__} ({value!r})")
    if value <= 0:
        raise ValueError(f"{owner}.{name} must be a positive number of {unit}, got {value}")


def _check_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{owner}.{name} must be True or False, got {value!r}")


@dataclass(frozen=True)
class AttentionConfig:
    """Sequence-chunked (FPDT) attention.

    Attributes:
        enabled: run the attention rewrite at all.
        chunk_size: tokens per query/key-value chunk. Memory of the attention core is
            O(chunk_size²) per head instead of O(T²); on a GPU, chunks of 8K-64K tokens hide
            host transfers behind compute. None (default): chosen from the shapes when the op
            runs, so one compiled graph serves every length and short sequences never pay
            for a chunk larger than they need (CPU: a chunk's score block holds no more
            numbers than q itself, at least 64 tokens; CUDA: up to 16K tokens).
        offload: keep each layer's q/k/v/output/log-sum-exp in pinned host memory between
            forward and backward (prefetched back chunk by chunk). On by default: fused
            SDPA kernels already avoid the ``[T, T]`` matrix and save exactly q/k/v/out/lse,
            so moving those to the host is where chunked attention saves device memory.
            Turn it off when host memory is scarce; hand-written attention (which
            materialises ``[T, T]``) still gains without it.
        host_pool_bytes: upper bound on host memory the offload pool may hold (None: no bound).
    """

    enabled: bool = True
    chunk_size: int | None = None
    offload: bool = True
    host_pool_bytes: int | None = None

    def __post_init__(self) -> None:
        _check_bool("AttentionConfig", "enabled", self.enabled)
        _check_positive_int("AttentionConfig", "chunk_size", self.chunk_size, allow_none=True)
        _check_bool("AttentionConfig", "offload", self.offload)
        _check_positive_int("AttentionConfig", "host_pool_bytes", self.host_pool_bytes, allow_none=True, unit="bytes")


SSM_MODES = ("exact", "truncated")


@dataclass(frozen=True)
class SSMConfig:
    """Adjoint-sharded selective scans.

    Attributes:
        enabled: run the scan raising and rewrite passes at all.
        chunk_size: time steps per shard (Q). Saved state for backward is M·D·N numbers with
            M = ceil(T / Q), instead of T·D·N.
        mode: ``"exact"`` (default: gradients identical to autograd) or ``"truncated"``
            (the paper's truncated adjoint: each output's gradient reaches back only
            ``window`` steps through the state; biased, opt-in by name only).
        window: the truncation window T̄ (required with ``mode="truncated"``, refused otherwise).
        recompute_blocks: recompute the token-wise work of every block that holds a rewritten
            scan (norm, projections, convolution, gate) in backward instead of saving it, so
            a block keeps only its input for backward (O(T·hidden) per layer instead of about
            ten ``[T, D_inner]`` activations). Costs one extra forward of those blocks.
        shard_blocks: run every block around a rewritten scan chunk by chunk along the
            sequence, forward and backward, when the block is provably local along the
            sequence (otherwise ``recompute_blocks`` applies). A block then keeps its input
            and ``⌈T/block_chunk_size⌉`` scan states for backward, and works on one chunk at
            a time: its working memory no longer grows with T. Exact.
        block_chunk_size: tokens per block chunk. Working memory grows with it, Python and
            kernel-launch overhead per token shrinks. Sharding costs time: the scan's forward
            runs again in each chunk's backward and the block's token-wise work runs op by op;
            at 1024 (default) a small Mamba's CPU step takes 1.2x (2K-16K tokens) to 1.7x
            (64K) the time of ``recompute_blocks`` alone, for 1.7x-2.1x less peak memory.
    """

    enabled: bool = True
    chunk_size: int = 256
    mode: str = "exact"
    window: int | None = None
    recompute_blocks: bool = True
    shard_blocks: bool = True
    block_chunk_size: int = 1024

    def __post_init__(self) -> None:
        _check_bool("SSMConfig", "enabled", self.enabled)
        _check_positive_int("SSMConfig", "chunk_size", self.chunk_size, unit="time steps")
        if self.mode not in SSM_MODES:
            raise ValueError(f"SSMConfig.mode must be one of {SSM_MODES}, got {self.mode!r}")
        if self.mode == "truncated":
            if self.window is None:
                raise ValueError('SSMConfig(mode="truncated") needs window=<steps>: the number of time steps each gradient reaches back')
            _check_positive_int("SSMConfig", "window", self.window, unit="time steps")
        elif self.window is not None:
            raise ValueError('SSMConfig.window only applies to mode="truncated"; exact mode has no window')
        _check_bool("SSMConfig", "recompute_blocks", self.recompute_blocks)
        _check_bool("SSMConfig", "shard_blocks", self.shard_blocks)
        _check_positive_int("SSMConfig", "block_chunk_size", self.block_chunk_size)


@dataclass(frozen=True)
class LMLossConfig:
    """Sequence-tiled language-model head + cross-entropy.

    Attributes:
        enabled: run the LM-loss rewrite at all.
        chunk_size: tokens per tile. The loss is computed tile by tile from the hidden
            states and the head weight, so backward never holds ``[T, vocab]`` logits or
            their gradient: O(chunk_size · vocab) working memory instead of O(T · vocab).
            None (default): tiles whose logits hold no more numbers than the hidden states
            ``[T, hidden]`` (``⌈T·hidden / vocab⌉`` tokens) and at most 2^22 (the loss's
            working memory stops growing with T there), at least 64 tokens; chosen at run time.
        return_logits: in training (the loss needs a gradient) a model that returns its logits
            next to the loss returns ``None`` instead (Liger Kernel's convention), so the
            ``[T, vocab]`` logits and their zero gradient never exist. True keeps them (computed
            once, read by the tiled loss). Evaluation and ``generate`` (no gradient) always
            return them.
    """

    enabled: bool = True
    chunk_size: int | None = None
    return_logits: bool = False

    def __post_init__(self) -> None:
        _check_bool("LMLossConfig", "enabled", self.enabled)
        _check_positive_int("LMLossConfig", "chunk_size", self.chunk_size, allow_none=True)
        _check_bool("LMLossConfig", "return_logits", self.return_logits)


@dataclass(frozen=True)
class LayerConfig:
    """Sequence-pipelined Transformer layers (FPDT's layer pipeline).

    Each decoder layer around one causal attention (and, in a hybrid layer, a scan) runs one
    chunk of tokens at a time, forward in order and backward in reverse: the K/V history
    (and the layer's input) wait in the host pool, the device holds one chunk's activations.
    Exact. Opt-in for now: on a CPU the layer body runs op by op per chunk, and a step takes
    about 1.1-1.3x HF gradient checkpointing's time on an idle machine (more on a busy one).

    Attributes:
        enabled: pipeline every layer the sequence-window prover accepts (refusals are reported).
        chunk_size: tokens per layer chunk (None: ``attention.chunk_size``, or 1024 when that
            is chosen at run time).
        offload: keep the K/V history and layer inputs in the host pool (None: ``attention.offload``).
        tile_tokenwise: run the token-wise modules of layers that are not pipelined (their MLPs)
            chunk by chunk, recomputed in backward (``passes/tiled_tokenwise.py``): the
            ``[T, intermediate]`` activations are never saved. With ``offload``, the module
            between the last layer and the tiled LM loss (the final norm) runs so too, its
            input in the host pool. Exact; costs about one more MLP forward per step.
            None (default): on when ``enabled`` is (a pipelined stack's refused layers and its
            end are tiled), off otherwise.
    """

    enabled: bool = False
    chunk_size: int | None = None
    offload: bool | None = None
    tile_tokenwise: bool | None = None

    def __post_init__(self) -> None:
        _check_bool("LayerConfig", "enabled", self.enabled)
        _check_positive_int("LayerConfig", "chunk_size", self.chunk_size, allow_none=True)
        if self.offload is not None:
            _check_bool("LayerConfig", "offload", self.offload)
        if self.tile_tokenwise is not None:
            _check_bool("LayerConfig", "tile_tokenwise", self.tile_tokenwise)


@dataclass(frozen=True)
class DistributedConfig:
    """Sequence parallelism over ``torch.distributed`` (Ulysses attention, time-sharded scans).

    Attributes:
        sequence_parallel: ``P``, the number of consecutive ranks of ``process_group`` that
            share one sequence (each holds ``⌈T / P⌉`` tokens of it). None (default): off.
            Every rank of a group calls the model with the same full batch; the loss returned
            is the whole sequence's, and each parameter's gradient the whole batch's. Per-token
            outputs (logits, hidden states) are the rank's own shard of the sequence: its
            contiguous ``[r·L, (r+1)·L)``, or with ``layers.enabled`` its chunk-interleaved
            positions (FPDT's layout: the ``r``-th of every ``P`` chunks of ``layers``' chunk
            size; :func:`longctx_compiler.runtime.sequence_parallel.shard_positions`).
        process_group: the group whose ranks are split into sequence-parallel groups of ``P``
            (None: the default group, i.e. the world).
    """

    sequence_parallel: int | None = None
    process_group: Any = None

    def __post_init__(self) -> None:
        _check_positive_int("DistributedConfig", "sequence_parallel", self.sequence_parallel, allow_none=True, unit="ranks")

    @property
    def active(self) -> bool:
        """Whether sequences are sharded (``P > 1``)."""
        return self.sequence_parallel is not None and self.sequence_parallel > 1


@dataclass(frozen=True)
class Config:
    """Everything ``optimize`` needs to know.

    Attributes:
        attention: :class:`AttentionConfig`.
        ssm: :class:`SSMConfig`.
        lm_loss: :class:`LMLossConfig`.
        layers: :class:`LayerConfig` (sequence-pipelined Transformer layers; opt-in).
        distributed: :class:`DistributedConfig` (sequence parallelism; off by default).
        backend: ``"inductor"`` (default) or ``"aot_eager"`` (same passes, no code generation).
        strict: raise when a pass fails instead of falling back to the un-rewritten graph.
        sequence_dim: the dimension of tensor inputs that is the sequence (1 for ``[B, T]``
            token ids and ``[B, T, C]`` activations). It is compiled as a dynamic size, so one
            compiled graph serves every sequence length.
        extra_passes: user passes (instances of :class:`longctx_compiler.passes.base.Pass`)
            run after the built-in ones.
        packed_documents: keep packed documents apart in every sequence-mixing operation
            (attention, scans, causal convolutions), so that a packed row computes what its
            documents compute alone, even where the model's own code mixes them (transformers'
            Mamba models). The documents come from each call's ``seq_idx``, ``cu_seqlens`` or
            restarting ``position_ids`` (:mod:`longctx_compiler.runtime.documents`). Off by
            default: the model's own math is kept. An operation that mixes tokens and cannot
            be made document-aware makes the compile raise.
    """

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ssm: SSMConfig = field(default_factory=SSMConfig)
    lm_loss: LMLossConfig = field(default_factory=LMLossConfig)
    layers: LayerConfig = field(default_factory=LayerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    backend: str = "inductor"
    strict: bool = False
    sequence_dim: int | None = 1
    extra_passes: tuple = ()
    packed_documents: bool = False

    def __post_init__(self) -> None:
        # Sub-configs may be given as mappings for convenience: Config(attention={"chunk_size": 64}).
        for name, cls in (("attention", AttentionConfig), ("ssm", SSMConfig), ("lm_loss", LMLossConfig), ("layers", LayerConfig),
                          ("distributed", DistributedConfig)):
            value = getattr(self, name)
            if isinstance(value, Mapping):
                object.__setattr__(self, name, _build(cls, value, f"Config.{name}"))
            elif not isinstance(value, cls):
                raise TypeError(f"Config.{name} must be a {cls.__name__} or a dict of its fields, got {type(value).__name__}")
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; choose one of {BACKENDS}")
        _check_bool("Config", "strict", self.strict)
        if self.sequence_dim is not None:
            if isinstance(self.sequence_dim, bool) or not isinstance(self.sequence_dim, int):
                raise TypeError(f"Config.sequence_dim must be an int or None, got {type(self.sequence_dim).__name__} ({self.sequence_dim!r})")
            if self.sequence_dim < 0:
                raise ValueError(f"Config.sequence_dim must be a non-negative dimension index (1 for [B, T, ...] inputs) or None, got {self.sequence_dim}")
        _check_bool("Config", "packed_documents", self.packed_documents)
        if self.packed_documents and self.sequence_dim != 1:
            raise ValueError(f"Config.packed_documents takes documents over [batch, sequence] inputs: it needs sequence_dim=1, got {self.sequence_dim}")
        if self.packed_documents and self.distributed.active:
            raise ValueError("Config.packed_documents is not supported with sequence parallelism yet: a scan's reset and a "
                             "convolution's masked taps at a shard boundary are not carried across ranks")
        if not isinstance(self.extra_passes, tuple):
            object.__setattr__(self, "extra_passes", tuple(self.extra_passes))
        from longctx_compiler.passes.base import Pass

        for p in self.extra_passes:
            if not isinstance(p, Pass):
                raise TypeError(f"Config.extra_passes holds Pass instances, got {type(p).__name__}")

    def replace(self, **overrides: Any) -> "Config":
        """A copy with fields replaced; sub-config fields can be given as dicts that update them."""
        return _build(Config, overrides, "Config", base=self)


def _build(cls, values: Mapping[str, Any], owner: str, base: Any = None):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{owner} has no field(s) {unknown}; known fields: {sorted(known)}")
    if base is None:
        return cls(**values)
    merged = {}
    for k, v in values.items():
        current = getattr(base, k)
        if dataclasses.is_dataclass(current) and isinstance(v, Mapping):
            v = _build(type(current), v, f"{owner}.{k}", base=current)
        merged[k] = v
    return dataclasses.replace(base, **merged)
