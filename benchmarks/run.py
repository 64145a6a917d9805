"""Run a registered benchmark: ``python -m benchmarks.run <name> [options]``.

``python -m benchmarks.run --list`` lists them; every ``benchmarks/bench_<name>.py`` with a
``main(argv)`` function is registered under ``<name>``; ``<name> --help`` shows its options.
"""

from __future__ import annotations

import importlib
import sys

from benchmarks.common import discover


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    registry = discover()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print("usage: python -m benchmarks.run <name> [options]   (<name> --help for its options)")
        print("benchmarks: " + ", ".join(registry))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in registry:
        print(f"unknown benchmark {name!r}; registered: {', '.join(registry)}", file=sys.stderr)
        return 2
    return int(importlib.import_module(registry[name]).main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
