"""Command line: ``python -m longctx_compiler explain <module>:<factory>``.

The factory is a zero-argument callable returning what to explain and example inputs::

    def make():                      # in my_models.py
        model = build_model()
        ids = torch.randint(0, 100, (1, 4096))
        return model, (ids,), {"labels": ids}      # (target, args) or (target, args, kwargs)

    $ python -m longctx_compiler explain my_models:make --out report

prints the rewrite table and writes ``report.dot`` (+ ``report.svg`` when Graphviz is
installed) and, with ``--json``, ``report.json``. ``--set`` changes any :class:`Config`
field (``--set attention.chunk_size=4096 --set ssm.mode=truncated --set ssm.window=512``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
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


def _call_factory(spec: str, factory: Any, verbose: bool) -> Any:
    try:
        return factory()
    except TypeError as exc:
        import inspect

        try:
            params = [p for p in inspect.signature(factory).parameters.values() if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        except (TypeError, ValueError):
            params = []
        if params:
            raise SystemExit(f"{spec} must take no arguments (it needs {', '.join(p.name for p in params)}); wrap it in a function that supplies them") from exc
        if verbose:
            raise
        raise SystemExit(f"{spec} raised TypeError: {exc} (run with -v for the traceback)") from exc
    except Exception as exc:  # noqa: BLE001 - the user's code failed, not ours: say so, briefly
        if verbose:
            raise
        raise SystemExit(f"{spec} raised {type(exc).__name__}: {exc} (run with -v for the traceback)") from exc


def _config_fields() -> list[tuple[str, Any]]:
    """``[("attention.chunk_size", 1024), ...]``: every settable Config field and its default."""
    from longctx_compiler.config import Config

    out = []
    for f in dataclasses.fields(Config):
        default = getattr(Config(), f.name)
        if dataclasses.is_dataclass(default):
            out.extend((f"{f.name}.{g.name}", getattr(default, g.name)) for g in dataclasses.fields(default))
        elif f.name != "extra_passes":
            out.append((f.name, default))
    return out


def _parse_settings(items: Sequence[str]) -> dict[str, Any]:
    """``["attention.chunk_size=4096", "strict=true"]`` → nested Config overrides."""
    known = dict(_config_fields())
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or key not in known:
            raise SystemExit(f"--set takes FIELD=VALUE with FIELD one of: {', '.join(known)} (got {item!r})")
        low = text.strip().lower()
        if low in ("true", "false", "none"):
            value: Any = {"true": True, "false": False, "none": None}[low]
        else:
            try:
                value = ast.literal_eval(text.strip())
            except (ValueError, SyntaxError):
                value = text.strip()
        head, _, tail = key.partition(".")
        if tail:
            overrides.setdefault(head, {})[tail] = value
        else:
            overrides[head] = value
    return overrides


def _unpack(made: Any) -> tuple[Any, tuple, dict]:
    if isinstance(made, tuple) and len(made) in (2, 3):
        target, args = made[0], made[1]
        kwargs = made[2] if len(made) == 3 else {}
        if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
            raise SystemExit("the factory must return (target, args_tuple) or (target, args_tuple, kwargs_dict)")
        return target, tuple(args), kwargs
    raise SystemExit("the factory must return (target, args_tuple) or (target, args_tuple, kwargs_dict)")


def main(argv: Sequence[str] | None = None) -> int:
    fields = "\n".join(f"  {name} (default: {default!r})" for name, default in _config_fields())
    parser = argparse.ArgumentParser(
        prog="python -m longctx_compiler",
        description=__doc__.split("\n\n")[0],
        epilog="commands:\n  explain   show what optimize() would rewrite for a model, and draw it\n\n"
        "example:\n  python -m longctx_compiler explain my_models:make --out report --json --set attention.chunk_size=4096",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser(
        "explain",
        help="show what optimize() would rewrite, and draw it",
        description="Capture <module>:<factory>'s model with Dynamo, run the passes, print the rewrite table and draw it.",
        epilog=f"config fields for --set:\n{fields}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ex.add_argument("factory", help="<module>:<factory> (or file.py:factory) returning (target, args[, kwargs])")
    ex.add_argument("--out", default="longctx_report", help="path prefix of the drawing (default: %(default)s)")
    ex.add_argument("--format", default="svg", choices=("svg", "png", "pdf"), help="drawing format when Graphviz is installed")
    ex.add_argument("--json", action="store_true", help="also write <out>.json")
    ex.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="change a Config field (repeatable; fields listed below)")
    ex.add_argument("--attention-chunk-size", type=int, default=None, help="same as --set attention.chunk_size=N")
    ex.add_argument("--ssm-chunk-size", type=int, default=None, help="same as --set ssm.chunk_size=N")
    ex.add_argument("-v", "--verbose", action="store_true", help="log what each pass does; show tracebacks of the factory's errors")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    from longctx_compiler import Config, explain
    from longctx_compiler.viz import render

    overrides = _parse_settings(args.set)
    if args.attention_chunk_size is not None:
        overrides.setdefault("attention", {})["chunk_size"] = args.attention_chunk_size
    if args.ssm_chunk_size is not None:
        overrides.setdefault("ssm", {})["chunk_size"] = args.ssm_chunk_size
    try:
        config = Config().replace(**overrides)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"invalid configuration: {exc}") from exc

    target, fargs, fkwargs = _unpack(_call_factory(args.factory, _load_factory(args.factory), args.verbose))
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
