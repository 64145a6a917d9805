"""A normal (non-editable) install maps passes/ and kernels/ to longctx_compiler.passes/.kernels."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("setuptools") is None, reason="needs setuptools to build the wheel")
def test_wheel_installs_mapped_subpackages(tmp_path):
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("*.whl")
    target = tmp_path / "site"
    inst = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=300)
    assert inst.returncode == 0, inst.stderr[-2000:]
    probe = (
        "import longctx_compiler, longctx_compiler.passes.attention, longctx_compiler.kernels.attention, "
        "longctx_compiler.kernels.selective_scan; "
        "import importlib.resources as r; "
        "print(longctx_compiler.__file__); "
        "print(r.files('longctx_compiler.kernels').joinpath('attention/README.md').is_file())"
    )
    # Run from an empty directory with only the installed copy on the path (not the checkout).
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    first, second = res.stdout.split()
    assert first.startswith(str(target)) and second == "True"
    # generic names are not claimed
    assert not (target / "passes").exists() and not (target / "kernels").exists()
