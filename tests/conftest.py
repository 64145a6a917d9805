"""Shared test settings: hypothesis profiles, fresh compiler state, GPU skips."""

import os
import sys

import pytest
import torch
from hypothesis import HealthCheck, settings

# Test helpers that live beside this file (e.g. the test-only pass) import from any subfolder.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# CI runs a fixed, derandomised set of examples so a red build reproduces; locally the
# default profile explores new examples every run.
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile(
    "dev",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# A cache hit must never hide a pass bug: compile every graph for real.
torch._inductor.config.force_disable_caches = True

# Under pytest-xdist the workers share the machine's cores: each takes its share of intra-op
# threads, so OpenMP pools do not spin against each other (that costs far more than it gives
# on the many small ops of a chunked graph).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def pytest_report_header(config):
    # Which releases this run tested: a red build on a new release is then one line away.
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "triton", "transformers", "hypothesis", "sympy", "accelerate", "peft", "trl"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} (not installed)")
    return "longctx_compiler tested on: " + ", ".join(found)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test starts with an empty Dynamo cache, so recompile limits and cached graphs
    # from one test cannot leak into another.
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
