"""Shared machinery for the benchmarks in this folder.

A benchmark script (``benchmarks/bench_<name>.py``) defines ``main(argv)`` and one or more
*worker* functions. Each measured configuration runs in its own Python subprocess
(:func:`run_isolated`) under a wall-clock limit, so a baseline that runs out of memory or
takes too long is recorded with a status (:data:`OK`, :data:`TIMEOUT`, :data:`OOM`,
:data:`ERROR`, :data:`SKIPPED`) instead of killing the sweep. Results are written as one
JSON file with the environment they were taken in (:func:`write_results`) and drawn with
matplotlib's ``Agg`` backend (:func:`new_figure`, :func:`plot_series`).

Run any registered benchmark with ``python -m benchmarks.run <name> [options]``; the
registry (:func:`discover`) is every ``bench_<name>.py`` module here with a ``main``.

Worker protocol (what :func:`run_isolated` expects): a worker is a module-level function
``f(**kwargs) -> dict`` whose kwargs and result are JSON-able. It may call
:func:`report_progress` to leave partial results that survive a timeout, and may raise
:class:`StepTimeout` to stop itself once a measured step exceeded the caller's limit.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import json
import logging
import os
import pkgutil
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

__all__ = [
    "OK", "TIMEOUT", "OOM", "ERROR", "SKIPPED", "STATUSES",
    "StepTimeout", "REPO_ROOT", "RESULTS_DIR",
    "env_metadata", "git_commit", "time_steps", "ratio",
    "run_isolated", "report_progress", "write_results", "read_results",
    "CountingSaveOnCpu", "new_figure", "plot_series", "discover", "fmt_bytes",
    "token_label", "parse_tokens", "sleep_worker",
]

logger = logging.getLogger("longctx_compiler.benchmarks")

#: Run statuses recorded in result JSON.
OK = "ok"
TIMEOUT = "timeout"
OOM = "oom"
ERROR = "error"
SKIPPED = "skipped"
STATUSES = (OK, TIMEOUT, OOM, ERROR, SKIPPED)

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"

_PROGRESS_ENV = "LONGCTX_BENCH_PROGRESS"


class StepTimeout(RuntimeError):
    """Raised by a worker whose measured step took longer than the limit it was given.

    The worker's partial results (:func:`report_progress`) are kept and the run is recorded
    as :data:`TIMEOUT` with ``"timeout_kind": "measured"``.
    """


# ------------------------------------------------------------------------------ environment
def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository at ``root``."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10, check=True).stdout
        return {"commit": sha, "dirty": bool(status.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def env_metadata() -> dict[str, Any]:
    """Where the numbers come from: library versions, device, CPU count, git commit, time."""
    import torch

    meta: dict[str, Any] = {
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    for mod in ("transformers", "triton", "longctx_compiler"):
        try:
            meta[mod] = getattr(importlib.import_module(mod), "__version__", "unknown")
        except ImportError:
            meta[mod] = None
    meta.update({"git_" + k: v for k, v in git_commit().items()})
    return meta


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def ratio(value: float | None, baseline: float | None) -> float | None:
    """``value / baseline``, or None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return value / baseline


# ------------------------------------------------------------------------------ timing
def time_steps(step: Callable[[], Any], *, repeats: int, warmup: int = 0, before_each: Callable[[], Any] | None = None,
               sync: Callable[[], Any] | None = None, limit_s: float | None = None) -> dict[str, Any]:
    """Wall-clock seconds of ``step()``: ``warmup`` untimed calls, then ``repeats`` timed ones.

    ``before_each`` runs untimed before every call (e.g. ``zero_grad``); ``sync`` runs inside
    the timed region after the step (e.g. ``torch.cuda.synchronize``). If a timed call takes
    longer than ``limit_s``, :class:`StepTimeout` is raised after recording progress.

    Returns ``{"times_s", "min_s", "median_s", "mean_s", "repeats", "warmup"}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        if before_each:
            before_each()
        step()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        if before_each:
            before_each()
        t0 = time.perf_counter()
        step()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
        report_progress({"step_times_s": list(times)})
        if limit_s is not None and times[-1] > limit_s:
            raise StepTimeout(f"a timed step took {times[-1]:.1f} s > limit {limit_s:.0f} s")
    return {
        "times_s": times,
        "min_s": min(times),
        "median_s": statistics.median(times),
        "mean_s": statistics.fmean(times),
        "repeats": repeats,
        "warmup": warmup,
    }


# ------------------------------------------------------------------------------ isolation
def report_progress(update: Mapping[str, Any]) -> None:
    """Merge ``update`` into this worker's partial results (kept if the run times out).

    A no-op outside :func:`run_isolated` workers.
    """
    path = os.environ.get(_PROGRESS_ENV)
    if not path:
        return
    try:
        current = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    except (OSError, ValueError):
        current = {}
    current.update(update)
    tmp = path + ".tmp"
    Path(tmp).write_text(json.dumps(current, default=str))
    os.replace(tmp, path)


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _worker_main(argv: Sequence[str]) -> int:
    """Entry point of the child process: ``python -m benchmarks.common _worker MOD FUNC ARGS OUT``."""
    mod_name, func_name, args_path, out_path = argv
    # This file runs as ``__main__`` here: workers raise the class of the imported module.
    from benchmarks.common import StepTimeout

    try:
        kwargs = json.loads(Path(args_path).read_text())
        func = getattr(importlib.import_module(mod_name), func_name)
        result = {"status": OK, "result": func(**kwargs)}
    except StepTimeout as exc:
        result = {"status": TIMEOUT, "timeout_kind": "measured", "error": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - everything is recorded, nothing is lost
        result = {"status": OOM if _is_oom(exc) else ERROR, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()[-4000:]}
    Path(out_path).write_text(json.dumps(result, default=str))
    return 0


def run_isolated(module: str, function: str, kwargs: Mapping[str, Any], *, timeout_s: float,
                 env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run ``module.function(**kwargs)`` in a fresh Python process with a wall-clock limit.

    Returns a record with ``status`` (one of :data:`STATUSES`), ``wall_s`` (the whole child
    process, imports included), ``result`` (the worker's dict when ``status == "ok"``),
    ``progress`` (partial results reported before a failure), and ``error`` text otherwise.
    A child killed by the kernel (SIGKILL, typically the OOM killer) is recorded as ``oom``;
    one that outlives ``timeout_s`` is killed with its process group and recorded as
    ``timeout`` with ``"timeout_kind": "wall"``.
    """
    with tempfile.TemporaryDirectory(prefix="longctx_bench_") as tmp:
        args_path, out_path, progress_path = (os.path.join(tmp, n) for n in ("args.json", "out.json", "progress.json"))
        Path(args_path).write_text(json.dumps(dict(kwargs)))
        child_env = dict(os.environ)
        child_env.update(env or {})
        child_env[_PROGRESS_ENV] = progress_path
        # The repository root first, so `benchmarks` imports from this checkout.
        child_env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in [child_env.get("PYTHONPATH")] if p])
        cmd = [sys.executable, "-m", "benchmarks.common", "_worker", module, function, args_path, out_path]
        t0 = time.perf_counter()
        # A new session makes the child the leader of its own process group, so a timeout
        # ends it and anything it started (compile workers) without touching anything else.
        proc = subprocess.Popen(cmd, cwd=str(REPO_ROOT), env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            timed_out = True
        wall = time.perf_counter() - t0
        progress = {}
        if Path(progress_path).exists():
            with contextlib.suppress(OSError, ValueError):
                progress = json.loads(Path(progress_path).read_text())
        if timed_out:
            record = {"status": TIMEOUT, "timeout_kind": "wall", "error": f"killed after {timeout_s:.0f} s wall-clock limit"}
        elif Path(out_path).exists():
            record = json.loads(Path(out_path).read_text())
        elif proc.returncode is not None and proc.returncode < 0 and -proc.returncode == signal.SIGKILL:
            record = {"status": OOM, "error": "child killed by SIGKILL (most likely the out-of-memory killer)"}
        else:
            record = {"status": ERROR, "error": f"child exited with code {proc.returncode} without a result"}
        record["wall_s"] = round(wall, 3)
        if hasattr(os, "getloadavg"):
            # Other work on a shared machine changes step times: keep the load with the run.
            record["load_avg_1m_after"] = round(os.getloadavg()[0], 2)
        if progress:
            record["progress"] = progress
        if record["status"] != OK:
            record["output_tail"] = (output or "")[-2000:]
        return record


# ------------------------------------------------------------------------------ results
def write_results(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` plus ``"environment"`` (:func:`env_metadata`) as indented JSON.

    The file is replaced atomically, so an interrupted sweep never leaves half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = dict(payload)
    doc.setdefault("environment", env_metadata())
    tmp = path.with_suffix(path.suffix + ".tmp")
    text = json.dumps(doc, indent=2, default=str, allow_nan=False)
    # Paths inside the repository are written relative to it: a result file is the same
    # wherever the checkout lives.
    text = text.replace(json.dumps(str(REPO_ROOT) + os.sep)[1:-1], "")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


def read_results(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------ host tier
class CountingSaveOnCpu:
    """``torch.autograd.graph.save_on_cpu`` that also counts the bytes it moves to the host.

    The packing itself is torch's own (``save_on_cpu(pin_memory=...)``); a wrapper around its
    pack hook records each distinct storage handed to it, so ``host_bytes`` is the size of
    the host tier that ``save_on_cpu`` created during the step. Use as a context manager.
    On a CPU-only machine ``tensor.cpu()`` returns the tensor itself: nothing moves, and the
    device peak is unchanged; the count is still what would move on a GPU.
    """

    def __init__(self, pin_memory: bool = False):
        import torch

        self._hooks = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
        self._inner_pack = self._hooks.pack_hook
        self._hooks.pack_hook = self._pack
        self._seen: dict[tuple[str, int], tuple[Any, int]] = {}
        self.host_bytes = 0

    def _pack(self, t):
        try:
            st = t.untyped_storage()
            key = (str(t.device), st.data_ptr())
            prev = self._seen.get(key)
            if prev is None or prev[0]() is not st:
                self._seen[key] = (weakref.ref(st), st.nbytes())
                self.host_bytes += st.nbytes()
        except (RuntimeError, NotImplementedError, TypeError):
            pass
        return self._inner_pack(t)

    def __enter__(self) -> "CountingSaveOnCpu":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


# ------------------------------------------------------------------------------ plotting
def new_figure(nrows: int, ncols: int, *, size: tuple[float, float] = (5.2, 3.8)):
    """A matplotlib figure on the ``Agg`` backend (no display needed): ``(fig, axes[r][c])``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


def plot_series(ax, series: Mapping[str, Sequence[tuple[float, float | None]]], *, title: str, xlabel: str, ylabel: str,
                logx: bool = True, logy: bool = True, styles: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """One line per name from ``(x, y)`` points; points with ``y is None`` (failed runs) are left out."""
    for name, pts in series.items():
        pts = [(x, y) for x, y in pts if y is not None]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name, **dict((styles or {}).get(name, {})))
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


# ------------------------------------------------------------------------------ registry
def discover() -> dict[str, str]:
    """Registered benchmarks: ``{name: module}`` for every ``benchmarks/bench_<name>.py``."""
    import benchmarks

    found = {}
    for info in pkgutil.iter_modules(benchmarks.__path__):
        if info.name.startswith("bench_"):
            found[info.name[len("bench_"):]] = f"benchmarks.{info.name}"
    return dict(sorted(found.items()))


def token_label(n: int) -> str:
    """``2048 -> "2K"``, ``32768 -> "32K"``, other values unchanged."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def parse_tokens(values: Iterable[str]) -> list[int]:
    """``["2K", "4096", "1M"]`` -> ``[2048, 4096, 1048576]``."""
    out = []
    for v in values:
        for part in str(v).split(","):
            part = part.strip().upper()
            if not part:
                continue
            mult = {"K": 1024, "M": 1024 * 1024}.get(part[-1], 1)
            out.append(int(part[:-1] if mult > 1 else part) * mult)
    return out


def sleep_worker(seconds: float = 0.0, step_timeout: bool = False) -> dict[str, Any]:
    """A worker that only waits (and optionally gives up like a too-slow step): tests of the runner use it."""
    report_progress({"started": True})
    time.sleep(seconds)
    if step_timeout:
        raise StepTimeout("told to give up")
    return {"slept_s": seconds}


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "_worker":
        sys.exit(_worker_main(sys.argv[2:]))
    sys.exit("benchmarks.common is a library; run a benchmark with `python -m benchmarks.run <name>`")
