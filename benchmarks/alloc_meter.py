"""Exact CPU allocation meter for benchmark child processes (an ``LD_PRELOAD`` shim).

``alloc_meter.c`` (next to this file) interposes ``malloc``, ``calloc``, ``realloc``,
``reallocarray``, ``free``, ``posix_memalign``, ``aligned_alloc``, ``memalign``, ``valloc``
and ``pvalloc``, forwards each call to glibc and keeps, with atomics, the bytes in live blocks
whose ``malloc_usable_size`` is at least a threshold (default 1 KiB) and their high-water mark.
PyTorch's CPU allocator (c10 ``alloc_cpu``) allocates tensor storage with
``posix_memalign(64, nbytes)``, so every tensor of 1 KiB or more is counted at its usable
size (its byte count rounded up to glibc's chunk granularity: +8 to +24 bytes for small heap
blocks, up to the page for ``mmap``-served ones), in every thread, compiled code included.

Use, parent side::

    env = alloc_meter.child_env()          # compiles the shim on first use; {"LD_PRELOAD": ...}
    subprocess.run(cmd, env={**os.environ, **env})

child side::

    with alloc_meter.AllocPeak() as m:
        step()
    m.peak_bytes   # high-water mark during the block above the level at entry
    m.end_bytes    # level at exit above the level at entry

The shim is compiled on demand with the system C compiler (``$CC``, ``cc``, ``gcc`` or
``clang``; ``-O2 -shared -fPIC ... -ldl``) into ``$XDG_CACHE_HOME/longctx_compiler/alloc_meter``
(default ``~/.cache/...``; a per-user temporary directory if that is not writable), named by a
hash of the source and the compiler, so edits rebuild it. Without a compiler,
:class:`MeterUnavailable` says so.

What it counts and what it does not:

* counted: every heap block of >= ``threshold`` usable bytes allocated through the C
  allocation functions, by any library and thread (tensor storages, and also large
  non-tensor buffers: Python lists/dicts past 1 KiB, OpenMP/Inductor scratch, profiler
  buffers when a profiler runs);
* not counted: blocks below the threshold (small tensors such as scalars, Python and C++
  small objects), Python's small-object arenas (``mmap``-ed directly by ``obmalloc``), memory
  ``mmap``-ed directly (file mappings, shared memory), and allocator overheads and freed
  memory glibc keeps (RSS sees those; this meter does not).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "MeterUnavailable", "SOURCE", "THRESHOLD_ENV", "DEFAULT_THRESHOLD", "find_compiler", "build", "child_env",
    "library", "is_active", "current", "peak", "reset_peak", "threshold", "AllocPeak",
]

SOURCE = Path(__file__).resolve().with_suffix(".c")
#: Environment variable read by the shim at start-up: the smallest usable size counted.
THRESHOLD_ENV = "LONGCTX_ALLOC_METER_THRESHOLD"
DEFAULT_THRESHOLD = 1024


class MeterUnavailable(RuntimeError):
    """The allocation meter cannot be built (no C compiler, failed compile) or is not loaded."""


def find_compiler() -> str | None:
    """The C compiler to use: ``$CC`` if set, else the first of ``cc``, ``gcc``, ``clang`` on PATH."""
    cands = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for c in cands:
        path = shutil.which(c)
        if path:
            return path
    return None


def _cache_dirs() -> list[Path | None]:
    """The user's cache directory, then ``None``: a fresh private temporary directory.

    Never a predictable shared path: a library preloaded into every benchmark process must
    come from a directory only this user can write.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return [Path(base) / "longctx_compiler" / "alloc_meter", None]


def _trusted(path: Path) -> bool:
    """Owned by this user and not writable by group or others (so nobody else can swap it)."""
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_uid == os.getuid() and not (st.st_mode & 0o022)


def build(cache_dir: str | os.PathLike | None = None) -> Path:
    """Compile the shim if needed and return the absolute path of the shared library.

    Raises :class:`MeterUnavailable` when no C compiler is found or compilation fails.
    """
    cc = find_compiler()
    if cc is None:
        raise MeterUnavailable("no C compiler found ($CC, cc, gcc or clang on PATH): the LD_PRELOAD allocation "
                               "meter (benchmarks/alloc_meter.c) cannot be built")
    src = SOURCE.read_bytes()
    key = hashlib.sha256(src + b"\0" + cc.encode()).hexdigest()[:16]
    dirs = [Path(cache_dir)] if cache_dir is not None else _cache_dirs()
    errors = []
    for d in dirs:
        try:
            if d is None:
                d = Path(tempfile.mkdtemp(prefix="longctx_alloc_meter-"))  # mode 0700, unpredictable
            else:
                d.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        if not _trusted(d):
            errors.append(f"{d}: not owned by this user or writable by others; refusing to preload a library from it")
            continue
        lib = d / f"alloc_meter-{key}.so"
        if lib.is_file():
            if _trusted(lib):
                return lib.resolve()
            errors.append(f"{lib}: not owned by this user or writable by others; refusing to preload it")
            continue
        try:
            fd, tmp = tempfile.mkstemp(prefix=".alloc_meter-", suffix=".so", dir=d)
            os.close(fd)
        except OSError as e:
            errors.append(f"{d}: {e}")
            continue
        cmd = [cc, "-O2", "-shared", "-fPIC", "-std=gnu11", "-o", tmp, str(SOURCE), "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            raise MeterUnavailable(f"compiling the allocation meter failed ({' '.join(cmd)}):\n{proc.stderr[-2000:]}")
        os.replace(tmp, lib)  # atomic: concurrent builders leave one complete file
        return lib.resolve()
    raise MeterUnavailable("no writable cache directory for the allocation meter: " + "; ".join(errors))


def child_env(base: Mapping[str, str] | None = None, *, threshold: int | None = None) -> dict[str, str]:
    """Environment entries that load the meter into a child process: ``LD_PRELOAD`` (the shim
    first, then whatever ``base``/``os.environ`` already preloads) and, if given, the threshold."""
    lib = str(build())
    base = os.environ if base is None else base
    prior = [p for p in base.get("LD_PRELOAD", "").replace(":", " ").split() if p and p != lib]
    env = {"LD_PRELOAD": " ".join([lib] + prior)}
    if threshold is not None:
        env[THRESHOLD_ENV] = str(int(threshold))
    return env


_LIB: Any = None


def library() -> Any:
    """The preloaded shim in this process (ctypes), or :class:`MeterUnavailable` if it is not preloaded."""
    global _LIB
    if _LIB is not None:
        return _LIB
    preload = os.environ.get("LD_PRELOAD", "").replace(":", " ").split()
    names = [p for p in preload if Path(p).name.startswith("alloc_meter-") and p.endswith(".so")]
    if not names:
        raise MeterUnavailable("the allocation meter is not preloaded in this process; launch it with "
                               "benchmarks.alloc_meter.child_env() in its environment")
    try:
        # RTLD_NOLOAD: the instance ld.so preloaded (the one interposing malloc), never a second copy.
        lib = ctypes.CDLL(names[0], mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
    except OSError as e:
        raise MeterUnavailable(f"LD_PRELOAD names {names[0]} but it is not loaded: {e}") from e
    for name in ("meter_current", "meter_peak", "meter_alloc_calls", "meter_threshold"):
        getattr(lib, name).restype = ctypes.c_longlong
        getattr(lib, name).argtypes = []
    lib.meter_reset_peak.restype = None
    lib.meter_reset_peak.argtypes = []
    # Prove the interposition is live: a 1 MiB Python buffer is a counted malloc.
    before = lib.meter_current()
    buf = bytearray(1 << 20)
    grew = lib.meter_current() - before
    del buf
    if grew < (1 << 20):
        raise MeterUnavailable(f"the allocation meter is loaded but does not see allocations (+{grew} B for a 1 MiB buffer)")
    _LIB = lib
    return lib


def is_active() -> bool:
    """Whether this process runs with the meter preloaded and interposing allocations."""
    try:
        library()
        return True
    except MeterUnavailable:
        return False


def current() -> int:
    """Bytes in live counted blocks now."""
    return int(library().meter_current())


def peak() -> int:
    """High-water mark of :func:`current` since the last :func:`reset_peak`."""
    return int(library().meter_peak())


def reset_peak() -> None:
    """Set the high-water mark to the current level."""
    library().meter_reset_peak()


def threshold() -> int:
    """The smallest usable block size the shim counts."""
    return int(library().meter_threshold())


class AllocPeak:
    """Peak allocated bytes during a ``with`` block, above the level at entry (exact; see module doc).

    After the block: ``peak_bytes`` (high-water mark minus the level at entry) and ``end_bytes``
    (level at exit minus level at entry). Not reentrant (one process-wide high-water mark).
    """

    def __init__(self) -> None:
        self._lib = library()
        self.start = 0
        self.peak_bytes: int | None = None
        self.end_bytes: int | None = None

    def __enter__(self) -> "AllocPeak":
        self.start = int(self._lib.meter_current())
        self._lib.meter_reset_peak()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.peak_bytes = int(self._lib.meter_peak()) - self.start
        self.end_bytes = int(self._lib.meter_current()) - self.start
