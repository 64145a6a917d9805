"""Shared by the attention op tests."""

import contextlib

import torch

from longctx_compiler.kernels.attention import chunked as attn_chunked
from longctx_compiler.testing import EXACT_RTOL, assert_exact, make_tensor, relative_error


@contextlib.contextmanager
def cpu_path(use_kernel: bool):
    """Run the CPU implementation through ATen's flash kernel for the chunk pairs it serves
    (``True``), or the generic torch path everywhere (``False``)."""
    saved = attn_chunked.USE_CPU_KERNEL
    attn_chunked.USE_CPU_KERNEL = use_kernel
    try:
        yield
    finally:
        attn_chunked.USE_CPU_KERNEL = saved


def out_and_grads(fn, q, k, v, sinks):
    """``fn``'s output and the gradients of a fixed non-uniform loss w.r.t. q, k, v (and sinks)."""
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    out = fn(q, k, v, sinks)
    w = make_tensor(out.shape, seed=7).to(out.dtype)
    return (out, *torch.autograd.grad((out * w).sum(), leaves))


NAMES = ("out", "dq", "dk", "dv", "dsinks")


def assert_grads_exact(got, ref, names, where=""):
    """Every gradient float64-exact (``EXACT_RTOL``), measured against its own norm or, if that
    is smaller, the largest gradient's norm (the scale of the terms every gradient sums).

    The floor matters where a gradient is analytically zero or nearly: ``dq`` with one visible
    key, and ``dq``/``dk`` under a saturated soft-cap, whose terms are scaled by
    ``1 − tanh²(r/c)``, computed by the reference's autograd and by the op alike from a rounded
    ``tanh``. Against their own (tiny) norm those hold O(1) round-off; on the step's scale it
    is round-off, and a wrong formula still shows as an O(1) error.
    """
    floor = max((r.norm().item() for r in ref), default=0.0)
    for name, a, b in zip(names, got, ref):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        err = relative_error(a, b, scale=floor)
        assert err <= EXACT_RTOL, f"{name}{where}: relative error {err:.3e} exceeds {EXACT_RTOL:.1e}"


def assert_out_and_grads_exact(got, ref, where=""):
    """``got``/``ref`` from :func:`_out_and_grads`: out, then every gradient."""
    assert got[0].shape == ref[0].shape and got[0].dtype == ref[0].dtype
    assert_exact(got[0], ref[0], name=f"out{where}")
    assert_grads_exact(got[1:], ref[1:], NAMES[1:], where)
