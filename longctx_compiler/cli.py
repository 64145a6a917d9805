"""Command line: ``python -m longctx_compiler explain <module>:<factory>``.

The factory is a zero-argument callable returning what to explain and example inputs::

    def make():                      # in my_models.py
        model = build_model()
        ids = torch.randint(0, 100, (1, 4096))
        return model, (ids,), {"labels": ids}      # (target, args) or (target, args, kwargs)

    $ python -m longctx_compiler explain my_models:make --out report

prints the rewrite table and writes ``report.dot`` (+ ``report.svg`` when Graphviz is
installed) and, with ``--json``, ``report.json``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

__all__ = ["main"]


def _load_factory(spec: str) -> Any:
    if ":" not in spec:
        raise SystemExit(f"expected <module>:<factory>, got {spec!r}")
    module_name, attr = spec.split(":", 1)
    # Let "file.py:factory" and modules in the working directory work without installing.
    sys.path.insert(0, str(Path.cwd()))
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        sys.path.insert(0, str(path.parent))
        module_name = path.stem
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SystemExit(f"cannot import {module_name!r}: {exc}") from exc
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise SystemExit(f"{module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise SystemExit(f"{spec} is not callable")
    return obj


def _unpack(made: Any) -> tuple[Any, tuple, dict]:
    if isinstance(made, tuple) and len(made) in (2, 3):
        target, args = made[0], made[1]
        kwargs = made[2] if len(made) == 3 else {}
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise SystemExit("the factory must return (target, args_tuple) or (target, args_tuple, kwargs_dict)")
        return target, tuple(args), kwargs
    raise SystemExit("the factory must return (target, args_tuple) or (target, args_tuple, kwargs_dict)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m longctx_compiler", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("explain", help="show what optimize() would rewrite, and draw it")
    ex.add_argument("factory", help="<module>:<factory> returning (target, args[, kwargs])")
    ex.add_argument("--out", default="longctx_report", help="path prefix of the drawing (default: %(default)s)")
    ex.add_argument("--format", default="svg", choices=("svg", "png", "pdf"), help="drawing format when Graphviz is installed")
    ex.add_argument("--json", action="store_true", help="also write <out>.json")
    ex.add_argument("--attention-chunk-size", type=int, default=None)
    ex.add_argument("--ssm-chunk-size", type=int, default=None)
    ex.add_argument("-v", "--verbose", action="store_true", help="log what each pass does")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from longctx_compiler import Config, explain
    from longctx_compiler.viz import render

    overrides: dict[str, Any] = {}
    if args.attention_chunk_size is not None:
        overrides["attention"] = {"chunk_size": args.attention_chunk_size}
    if args.ssm_chunk_size is not None:
        overrides["ssm"] = {"chunk_size": args.ssm_chunk_size}
    config = Config().replace(**overrides)

    target, fargs, fkwargs = _unpack(_load_factory(args.factory)())
    report = explain(target, *fargs, config=config, **fkwargs)
    print(report)
    written = render(report, args.out, format=args.format)
    if args.json:
        path = Path(f"{args.out}.json")
        path.write_text(json.dumps(report.to_json(), indent=2))
        written.append(path)
    for path in written:
        print(f"wrote {path}")
    return 0
