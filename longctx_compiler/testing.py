"""Gradient-equivalence test kit: for our own tests and for users checking their models.

Two rules, used everywhere (they are the project's definition of "correct"):

* **Exactness is stated in float64.** A rewrite of a float64 computation must match the
  original to a relative error of ``1e-10`` (norm-wise), outputs and every gradient.
* **Low precision is judged against plain PyTorch's own error.** For a 16/32-bit run the
  candidate's error against a float64 reference must be at most ``factor`` (default 2) times
  the error that the baseline (plain PyTorch, same dtype) has against that same reference.
  This is flash-attention's test rule: no tolerance is tuned by hand.

Tensors are drawn from a seeded ``torch.Generator`` so that every hypothesis example is
reproducible from its seed alone.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "EXACT_RTOL",
    "relative_error",
    "make_tensor",
    "assert_exact",
    "assert_within_dtype_rule",
    "GradientReport",
    "assert_gradients_match",
    "strategies",
]

#: Relative (norm-wise) error allowed between two float64 computations that are meant to be
#: mathematically identical: round-off of re-associated sums stays far below this.
EXACT_RTOL = 1e-10


def relative_error(actual: torch.Tensor, expected: torch.Tensor, *, scale: float = 0.0) -> float:
    """Norm-wise relative error ``||actual - expected|| / max(||expected||, scale)``, in float64.

    ``scale`` floors the denominator: a tensor that is analytically zero (or nearly: e.g. the
    query-projection gradient when every query attends to exactly one key) holds only
    round-off, and relative to its own norm that round-off is O(1). Passing the magnitude
    of the computation it belongs to (see :func:`assert_gradients_match`) measures it on the
    right scale. When the denominator is exactly zero the absolute error is returned.
    """
    if actual.shape != expected.shape:
        raise AssertionError(f"shape mismatch: {tuple(actual.shape)} vs {tuple(expected.shape)}")
    a = actual.detach().to(torch.float64).cpu()
    e = expected.detach().to(torch.float64).cpu()
    if not torch.isfinite(a).all():
        return math.inf
    denom = max(e.norm().item(), scale)
    diff = (a - e).norm().item()
    return diff / denom if denom > 0 else diff


def make_tensor(
    shape: Sequence[int],
    *,
    seed: int | torch.Generator,
    dtype: torch.dtype = torch.float64,
    device: str | torch.device = "cpu",
    low: float = -1.0,
    high: float = 1.0,
    requires_grad: bool = False,
) -> torch.Tensor:
    """A tensor of uniform values in ``[low, high)`` drawn from a seeded generator.

    Values are drawn in float64 on the CPU and then cast, so the same seed gives the same
    numbers (up to rounding) in every dtype and on every device: a low-precision run and its
    float64 reference see the same inputs.
    """
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(int(seed))
    t = torch.rand(tuple(shape), generator=gen, dtype=torch.float64) * (high - low) + low
    t = t.to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, *, rtol: float = EXACT_RTOL, name: str = "value") -> None:
    """Assert float64 equality up to re-association round-off (relative error ≤ ``rtol``)."""
    err = relative_error(actual, expected)
    if not err <= rtol:
        raise AssertionError(f"{name}: relative error {err:.3e} exceeds {rtol:.1e}")


def _dtype_floor(dtype: torch.dtype) -> float:
    # When plain PyTorch happens to be exact (error 0, e.g. tiny sums), allow the candidate a
    # few units of round-off of its dtype instead of demanding bit-equality.
    return 4 * torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def assert_within_dtype_rule(
    candidate: torch.Tensor,
    baseline: torch.Tensor,
    reference: torch.Tensor,
    *,
    factor: float = 2.0,
    name: str = "value",
) -> tuple[float, float]:
    """The dtype rule: ``err(candidate, reference) ≤ factor · err(baseline, reference)``.

    Args:
        candidate: the rewritten computation's result, in the low-precision dtype.
        baseline: plain PyTorch's result for the same inputs in the same dtype.
        reference: the float64 result (the ground truth).
    Returns:
        ``(candidate_error, baseline_error)``, relative errors against the reference.
    """
    cand_err = relative_error(candidate, reference)
    base_err = relative_error(baseline, reference)
    allowed = factor * base_err + _dtype_floor(candidate.dtype)
    if not cand_err <= allowed:
        raise AssertionError(
            f"{name}: error {cand_err:.3e} against the float64 reference exceeds {factor}x plain "
            f"PyTorch's error {base_err:.3e} in {candidate.dtype}"
        )
    return cand_err, base_err


@dataclass
class GradientReport:
    """What :func:`assert_gradients_match` compared: name → (candidate error, allowed)."""

    errors: dict[str, tuple[float, float]]

    def worst(self) -> tuple[str, float]:
        name = max(self.errors, key=lambda k: self.errors[k][0])
        return name, self.errors[name][0]

    def __str__(self) -> str:
        rows = [f"{k:60s} {e:.3e} (allowed {a:.1e})" for k, (e, a) in sorted(self.errors.items())]
        return "\n".join(rows)


def _run_and_grad(fn: Callable[..., Any], params: Mapping[str, torch.Tensor], inputs: Sequence[Any], loss_fn, call=None):
    out = call(fn, *inputs) if call is not None else fn(*inputs)
    loss = loss_fn(out)
    leaves = {f"param:{k}": p for k, p in params.items() if p.requires_grad}
    leaves.update({f"input:{i}": x for i, x in enumerate(inputs) if isinstance(x, torch.Tensor) and x.requires_grad})
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    result = {"loss": loss.detach()}
    for name, g, leaf in zip(leaves, grads, leaves.values()):
        result[name] = torch.zeros_like(leaf) if g is None else g.detach()
    return result


def _default_loss(out: Any) -> torch.Tensor:
    # Hugging Face models return an output object with a ``loss`` field when labels are given.
    if hasattr(out, "loss") and out.loss is not None:
        return out.loss
    if isinstance(out, (tuple, list)):
        out = out[0]
    if hasattr(out, "logits"):
        out = out.logits
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot derive a scalar loss from output of type {type(out).__name__}; pass loss_fn=")
    # A fixed, non-symmetric weighting so every output element's gradient is exercised and
    # differs from its neighbours (a plain sum would hide permutation bugs).
    w = torch.linspace(0.5, 1.5, out.numel(), dtype=out.dtype, device=out.device).reshape(out.shape)
    return (out * w).sum()


def assert_gradients_match(
    reference: Callable[..., Any] | torch.nn.Module,
    candidate: Callable[..., Any] | torch.nn.Module,
    inputs: Sequence[Any],
    *,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    rtol: float | None = None,
    baseline: Callable[..., Any] | torch.nn.Module | None = None,
    factor: float = 2.0,
    call: Callable[..., Any] | None = None,
) -> GradientReport:
    """Check that ``candidate`` computes the same loss and gradients as ``reference``.

    The loss and the gradient of every parameter (for modules; compared by name) and of every
    input tensor with ``requires_grad`` are compared, each by its norm-wise relative error.
    A gradient whose norm is below ``GRADIENT_FLOOR`` (1e-6) of the model's largest gradient
    is analytically (close to) zero and holds round-off only; it is measured against that
    floor rather than its own norm.

    Two modes:

    * **Exact** (``baseline`` is None): every relative error must be ≤ ``rtol``
      (default :data:`EXACT_RTOL`, meant for float64).
    * **Dtype rule** (``baseline`` given): ``reference`` is the float64 ground truth (its
      module/inputs in float64), ``baseline`` is plain PyTorch in the low precision and
      ``candidate`` the rewritten one in the same low precision; each candidate error must
      be ≤ ``factor`` × the baseline's error. ``inputs`` are given in the low precision and
      are cast to float64 for the reference.

    ``call(module, *inputs)``, when given, says how to run each model (e.g.
    ``lambda m, ids: m(ids, labels=ids)`` for a Hugging Face causal LM); by default each is
    called as ``module(*inputs)``. Gradients are taken with :func:`torch.autograd.grad`:
    nothing accumulates in ``.grad``.

    Returns:
        a :class:`GradientReport` of every comparison (useful to print in a notebook).
    """
    loss_fn = loss_fn or _default_loss

    def params_of(f):
        # torch.compile's wrapper prefixes names with "_orig_mod."; compare by the model's own names.
        if isinstance(f, torch._dynamo.eval_frame.OptimizedModule):
            f = f._orig_mod
        if isinstance(f, torch.nn.Module):
            return dict(f.named_parameters())
        inner = getattr(f, "_orig_mod", None) or getattr(f, "module", None)
        return dict(inner.named_parameters()) if isinstance(inner, torch.nn.Module) else {}

    if baseline is None:
        ref = _run_and_grad(reference, params_of(reference), inputs, loss_fn, call)
        cand = _run_and_grad(candidate, params_of(candidate), inputs, loss_fn, call)
        _check_same_keys(ref, cand)
        tol = EXACT_RTOL if rtol is None else rtol
        errors = {}
        floor = _gradient_floor(ref)
        for k in ref:
            err = relative_error(cand[k], ref[k], scale=floor)
            errors[k] = (err, tol)
        bad = {k: v for k, v in errors.items() if not v[0] <= v[1]}
        if bad:
            raise AssertionError("gradients differ:\n" + str(GradientReport(bad)))
        return GradientReport(errors)

    ref_inputs = [x.detach().to(torch.float64).requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
    ref = _run_and_grad(reference, params_of(reference), ref_inputs, loss_fn, call)
    base = _run_and_grad(baseline, params_of(baseline), inputs, loss_fn, call)
    cand = _run_and_grad(candidate, params_of(candidate), inputs, loss_fn, call)
    _check_same_keys(ref, cand)
    _check_same_keys(ref, base)
    errors = {}
    floor = _gradient_floor(ref)
    for k in ref:
        c_err = relative_error(cand[k], ref[k], scale=floor)
        b_err = relative_error(base[k], ref[k], scale=floor)
        errors[k] = (c_err, factor * b_err + _dtype_floor(cand[k].dtype))
    bad = {k: v for k, v in errors.items() if not v[0] <= v[1]}
    if bad:
        raise AssertionError(f"gradients exceed {factor}x plain PyTorch's error:\n" + str(GradientReport(bad)))
    return GradientReport(errors)


#: Gradients smaller than this fraction of the largest gradient of the same model are
#: compared on the scale of that fraction instead of their own norm (see relative_error).
GRADIENT_FLOOR = 1e-6


def _gradient_floor(values: Mapping[str, torch.Tensor]) -> float:
    norms = [v.detach().double().norm().item() for k, v in values.items() if k != "loss"]
    return GRADIENT_FLOOR * max(norms, default=0.0)


def _check_same_keys(a: Mapping[str, Any], b: Mapping[str, Any]) -> None:
    if set(a) != set(b):
        raise AssertionError(f"compared different things: only in reference {sorted(set(a) - set(b))}, only in candidate {sorted(set(b) - set(a))}")


def clone_module(module: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A deep copy of ``module`` (optionally cast), for running reference and candidate side by side."""
    m = copy.deepcopy(module)
    return m.to(dtype) if dtype is not None else m


class strategies:  # noqa: N801 - a namespace, used as ``strategies.seeds()``
    """Hypothesis strategies for shapes, chunk sizes, dtypes and seeds.

    Imported lazily so that the library itself does not depend on hypothesis.
    """

    @staticmethod
    def seeds():
        from hypothesis import strategies as st

        return st.integers(min_value=0, max_value=2**31 - 1)

    @staticmethod
    def sequence_lengths(min_value: int = 1, max_value: int = 64):
        from hypothesis import strategies as st

        return st.integers(min_value=min_value, max_value=max_value)

    @staticmethod
    def chunk_sizes(min_value: int = 1, max_value: int = 32):
        from hypothesis import strategies as st

        return st.integers(min_value=min_value, max_value=max_value)

    @staticmethod
    def low_precision_dtypes(include_bf16: bool = True, include_fp16: bool = False):
        from hypothesis import strategies as st

        choices = [torch.float32]
        if include_bf16:
            choices.append(torch.bfloat16)
        if include_fp16:
            choices.append(torch.float16)
        return st.sampled_from(choices)

    @staticmethod
    def shapes(names: Iterable[str], **bounds: tuple[int, int]):
        """A dict strategy: for each name, an integer drawn in ``bounds[name]`` (default 1..4)."""
        from hypothesis import strategies as st

        return st.fixed_dictionaries({n: st.integers(*bounds.get(n, (1, 4))) for n in names})
