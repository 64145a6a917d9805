"""The ordered registry of built-in passes.

Stages run in this order: ``raise`` (known spellings → canonical ops) before ``rewrite``
(canonical ops → memory-bounded implementations); within a stage, by ``order``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from longctx_compiler.config import Config
    from longctx_compiler.passes.base import Pass

STAGES = ("raise", "rewrite")

# (stage index, order, name, factory)
_REGISTRY: list[tuple[int, int, str, Callable[[], "Pass"]]] = []

# Modules holding built-in passes; imported on first use so that importing the package
# stays cheap and a pass module can import the kernels it needs.
_BUILTIN_MODULES: tuple[str, ...] = (
    "longctx_compiler.passes.attention",
    "longctx_compiler.passes.scan_to_selective_scan",
    "longctx_compiler.passes.adjoint_sharded_scan",
    "longctx_compiler.passes.depthwise_conv",
    "longctx_compiler.passes.adjoint_sharded_blocks",
    "longctx_compiler.passes.recompute_ssm_blocks",
    "longctx_compiler.passes.tiled_lm_loss",
    "longctx_compiler.passes.pipelined_layers",
)


def register_pass(stage: str, order: int) -> Callable[[type], type]:
    """Class decorator: add a pass class to the built-in pipeline at ``stage``/``order``."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")

    def deco(cls: type) -> type:
        name = cls.name
        if any(n == name for _, _, n, _ in _REGISTRY):
            raise ValueError(f"a pass named {name!r} is already registered")
        _REGISTRY.append((STAGES.index(stage), order, name, cls))
        _REGISTRY.sort(key=lambda e: (e[0], e[1]))
        return cls

    return deco


def builtin_passes() -> list["Pass"]:
    """Fresh instances of the built-in passes, in pipeline order."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return [factory() for _, _, _, factory in _REGISTRY]


def pipeline(config: "Config") -> list["Pass"]:
    """The passes one compilation runs: built-ins, then the config's extra passes."""
    return builtin_passes() + list(config.extra_passes)
