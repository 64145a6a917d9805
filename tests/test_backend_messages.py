"""What the backend tells the user, and how: one summary warning per compiled graph with
refusals, progress on the library's logger, nothing printed, and failures that name the pass."""

import ast
import logging
import pathlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from silu_test_pass import BrokenPass, SiluToCustomOp
from torch import nn

import longctx_compiler as lc
from longctx_compiler.backend import PassFailure, PassFailureWarning, RefusalWarning
from longctx_compiler.passes import CantApply, Pass
from longctx_compiler.testing import EXACT_RTOL, assert_gradients_match, make_tensor

ROOT = pathlib.Path(__file__).resolve().parents[1]


class Attention(nn.Module):
    def __init__(self, dropout):
        super().__init__()
        self.qkv = nn.Linear(16, 48, dtype=torch.float64)
        self.dropout = dropout

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return x + a.transpose(1, 2).reshape(b, t, 16)


class Stack(nn.Module):
    """Three attention layers, two with dropout: in training those two are refused."""

    def __init__(self, dropouts=(0.0, 0.1, 0.1)):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(Attention(p) for p in dropouts)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x.sum()


def optimized(model, **kw):
    return lc.optimize(model, backend="aot_eager", attention={"chunk_size": 4, "offload": False}, **kw)


def refusal_warnings(record):
    return [w for w in record if issubclass(w.category, RefusalWarning)]


def test_refused_sites_give_one_summary_warning_per_compile():
    opt = optimized(Stack())
    x = make_tensor((2, 9, 16), seed=0, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt(x).backward()
    (w,) = refusal_warnings(caught)
    assert opt.report.count("chunked_attention") == 1 and len(opt.report.refusals) == 2
    message = str(w.message)
    assert message.startswith("longctx_compiler: 2 of 3 sites were not rewritten (chunked_attention ×2: attention dropout p=0.1")
    assert message.endswith("; see model.report")
    # Attributed to the line that called the model, not to the compiler's internals.
    assert w.filename == __file__

    # Another length runs the same graph: no compile, no warning. A recompile of the same graph
    # (new guards: the input no longer needs no gradient) refuses the same sites: no warning either.
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        opt(make_tensor((2, 13, 16), seed=1, dtype=torch.float64)).backward()
        opt(make_tensor((2, 13, 16), seed=1, dtype=torch.float64).requires_grad_()).backward()
    assert opt.compile_count == 2
    assert len(opt.report.refusals) == 2
    assert refusal_warnings(again) == []


def test_no_refusal_no_warning():
    opt = optimized(Stack(dropouts=(0.0, 0.0, 0.0)))
    x = make_tensor((2, 9, 16), seed=2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_gradients_match(Stack(dropouts=(0.0, 0.0, 0.0)), opt, [x], rtol=EXACT_RTOL)
    assert opt.report.count("chunked_attention") == 3
    assert refusal_warnings(caught) == []


def test_explain_with_refusals_does_not_warn():
    # explain returns the report itself: a warning about it would say the same thing twice.
    x = make_tensor((2, 9, 16), seed=3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = lc.explain(Stack().train(), x, config=lc.Config(backend="aot_eager"))
    assert len(report.refusals) == 2 and report.count("chunked_attention") == 1
    assert refusal_warnings(caught) == []


@pytest.mark.filterwarnings("ignore::longctx_compiler.backend.RefusalWarning")
def test_progress_is_logged_at_info_with_duration_and_rewrites(caplog):
    opt = optimized(Stack())
    with caplog.at_level(logging.INFO, logger="longctx_compiler"):
        opt(make_tensor((2, 9, 16), seed=4, dtype=torch.float64))
    ours = [r for r in caplog.records if r.name == "longctx_compiler" and r.levelno == logging.INFO]
    started = [r.getMessage() for r in ours if r.getMessage().startswith("compiling graph 1 ")]
    finished = [r.getMessage() for r in ours if r.getMessage().startswith("compiled graph 1 in ")]
    assert len(started) == 1 and "aot_eager" in started[0]
    assert len(finished) == 1
    assert " s: chunked_attention ×1; 2 refused" in finished[0]
    # Per-site lines are DEBUG: a 32-layer model does not flood an INFO log.
    assert not [r for r in ours if "rewrote" in r.getMessage() or "refused at" in r.getMessage()]


def test_the_library_adds_only_a_null_handler():
    handlers = logging.getLogger("longctx_compiler").handlers
    assert handlers and all(isinstance(h, logging.NullHandler) for h in handlers)


def _library_files():
    for folder in ("longctx_compiler", "passes", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            # The command line's job is to print; everything else reports through logging,
            # warnings and the report object.
            if path.name in ("cli.py", "__main__.py"):
                continue
            yield path


def test_no_print_in_library_code():
    found = []
    for path in _library_files():
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert found == []
    assert len(list(_library_files())) > 20  # the walk did look at the library


def test_a_compile_and_step_write_nothing_to_stdout(capfd):
    opt = optimized(Stack())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RefusalWarning)
        opt(make_tensor((2, 9, 16), seed=5, dtype=torch.float64)).backward()
    out, err = capfd.readouterr()
    assert opt.report.count("chunked_attention") == 1
    assert out == ""
    assert err == ""


def silu_model(x):
    return F.silu(x).sum()


def test_fallback_warning_names_the_failing_pass():
    of = lc.optimize(silu_model, config=lc.Config(backend="aot_eager", extra_passes=(BrokenPass(),)))
    x = make_tensor((5,), seed=6)
    with pytest.warns(PassFailureWarning) as caught:
        out = of(x)
    torch.testing.assert_close(out, F.silu(x).sum())
    (w,) = [w for w in caught if issubclass(w.category, PassFailureWarning)]
    message = str(w.message)
    assert issubclass(w.category, RuntimeWarning)
    assert message.startswith("longctx_compiler: pass 'test_broken' failed at ")
    assert "RuntimeError: deliberate failure inside a pass" in message
    assert "compiling this graph without rewrites" in message
    assert w.filename == __file__
    assert "test_broken" in of.report.fallbacks[0]


def test_strict_failure_names_the_failing_pass():
    of = lc.optimize(silu_model, config=lc.Config(backend="aot_eager", strict=True, extra_passes=(BrokenPass(),)))
    with pytest.raises(PassFailure, match=r"pass 'test_broken' failed at .*deliberate failure inside a pass") as info:
        of(make_tensor((5,), seed=7))
    assert info.value.pass_name == "test_broken"
    assert info.value.site


class LongErrorPass(Pass):
    """Fails in ``check`` with a many-line message, as fake-tensor propagation errors do."""

    name = "test_long_error"

    def match(self, gm, ctx):
        yield from SiluToCustomOp().match(gm, ctx)

    def check(self, gm, match, ctx):
        raise ValueError("first line says what\n" + "\n".join(f"context line {i}" for i in range(20)))


def test_fallback_warning_is_one_line_and_the_traceback_goes_to_debug(caplog):
    of = lc.optimize(silu_model, config=lc.Config(backend="aot_eager", extra_passes=(LongErrorPass(),)))
    with caplog.at_level(logging.DEBUG, logger="longctx_compiler"), pytest.warns(PassFailureWarning) as caught:
        of(make_tensor((5,), seed=8))
    (w,) = [w for w in caught if issubclass(w.category, PassFailureWarning)]
    assert "\n" not in str(w.message) and "first line says what" in str(w.message)
    assert "test_long_error" in str(w.message)
    (debug,) = [r for r in caplog.records if r.levelno == logging.DEBUG and "falling back" in r.getMessage()]
    assert debug.exc_info and "context line 19" in str(debug.exc_info[1].__cause__)


def test_a_refusing_pass_is_not_a_failure():
    # CantApply is a refusal with a reason, never the fallback path.
    class Refuses(Pass):
        name = "test_refuses"

        def match(self, gm, ctx):
            yield from SiluToCustomOp().match(gm, ctx)

        def check(self, gm, match, ctx):
            raise CantApply("not today")

    of = lc.optimize(silu_model, config=lc.Config(backend="aot_eager", strict=True, extra_passes=(Refuses(),)))
    with pytest.warns(RefusalWarning, match=r"1 of 1 sites were not rewritten \(test_refuses ×1: not today\)"):
        of(make_tensor((5,), seed=9))
    assert not of.report.fallbacks
