"""Readable names from Dynamo's source spellings — the one place that parses them.

Dynamo names what it captured by *source*: the expression that reaches a value from the
traced frame. Module paths in ``node.meta["nn_module_stack"]`` and placeholder names are
built from those sources, and their spelling changes with how a model is wrapped and between
torch/transformers releases::

    L['self'].model.layers[0].self_attn                     # module's own forward
    L['args'][0].model.layers[0].self_attn                  # forward reached through a decorator
    L['args'].0.model.layers.0.self_attn                    # the same, another release
    L['kwargs']['model'].layers[0]                          # passed by keyword
    L['self']._modules['model']._modules['layers']['0']     # through _modules
    L['self'].__dict__['_modules']['base_model'].model      # PEFT wrappers
    getattr(L['self'].layers, '0').mixer                    # getattr spelling
    G['net'].blocks[1]                                      # a global module

All of these name the attribute path a user would write (``model.layers.0.self_attn``). The
same holds for the placeholder names Dynamo derives from them
(``l_args_0_modules_model_modules_layers_modules_0_modules_q_proj_parameters_weight_``).
"""

from __future__ import annotations

import re

__all__ = ["module_path", "readable_input_name"]

# One token of a source expression: .name | .0 | ['key'] | ["key"] | [0]
_TOKEN = re.compile(r"""\.([A-Za-z_][A-Za-z0-9_]*|\d+)|\[\s*(?:'([^']*)'|"([^"]*)"|(-?\d+))\s*\]""")
# Leading root of a source: L[...] (frame locals), G[...] (globals), or a bare local name.
_ROOT = re.compile(r"""^\s*(?:([LG])\[\s*(?:'([^']*)'|"([^"]*)")\s*\]|([A-Za-z_][A-Za-z0-9_]*))""")
_GETATTR = re.compile(r"""getattr\(\s*(.+?)\s*,\s*(?:'([^']*)'|"([^"]*)")\s*\)""")

# Container attributes that are part of how nn.Module stores children, never of the path a
# user writes.
_STORAGE = {"_modules", "_parameters", "_buffers", "__dict__"}
# Roots that stand for the traced callable itself: the path starts inside it.
_CALL_ROOTS = {"self", "fn", "func"}


def _tokens(path: str) -> tuple[str | None, list[str]]:
    """``(root, [attr-or-key, ...])`` of a source expression; root is the frame-local name."""
    # getattr(x, 'a') -> x.a, innermost first (they nest).
    prev = None
    while prev != path:
        prev = path
        path = _GETATTR.sub(lambda m: f"{m.group(1)}.{m.group(2) if m.group(2) is not None else m.group(3)}", path)
    m = _ROOT.match(path)
    if not m:
        return None, []
    root = m.group(2) or m.group(3) or m.group(4)
    rest = path[m.end():]
    out: list[str] = []
    pos = 0
    for t in _TOKEN.finditer(rest):
        if t.start() != pos:
            # Something we do not parse (a call, an operator): keep what we have so far.
            break
        pos = t.end()
        out.append(next(g for g in t.groups() if g is not None))
    return root, out


def module_path(source: str) -> str:
    """The attribute path of a module from Dynamo's source spelling of it.

    Returns ``""`` for the traced root module itself (callers show ``<root>``).

    >>> module_path("L['args'][0].model.layers[0].self_attn")
    'model.layers.0.self_attn'
    """
    root, toks = _tokens(str(source))
    if root is None:
        return str(source)
    # The argument containers: args[i] / kwargs['name'] select the module passed in; the
    # index or keyword is not part of the path inside it.
    if root in ("args", "kwargs"):
        toks = toks[1:]
    elif root not in _CALL_ROOTS:
        # A module reached by a local or global name (``step(model, x)``, ``G['net']``): the
        # name is where the user's path starts.
        toks = [root, *toks]
    return ".".join(t for t in toks if t not in _STORAGE)


_PLACEHOLDER_ROOT = re.compile(r"^l_(?:self_|args_\d+_|kwargs_[a-z0-9]+?_(?=modules_|parameters_|buffers_)|fn_|mod_)")
_PLACEHOLDER_ROLE = re.compile(r"_(?:modules|parameters|buffers)_")


def readable_input_name(name: str) -> str:
    """A graph input's name as a dotted path, for drawings.

    ``l_args_0_modules_model_modules_layers_modules_0_modules_q_proj_parameters_weight_``
    becomes ``model.layers.0.q_proj.weight``; names without Dynamo's module spelling (user
    inputs such as ``l_input_ids_``) lose only the ``l_`` prefix and trailing ``_``.
    """
    if not _PLACEHOLDER_ROLE.search(name):
        return re.sub(r"^l_|_$", "", name)
    body = _PLACEHOLDER_ROOT.sub("", name)
    body = re.sub(r"^(?:modules|parameters|buffers)_", "", body)
    body = _PLACEHOLDER_ROLE.sub(".", body)
    # PEFT and other wrappers reach modules through the instance dict.
    body = body.replace("__dict__._modules.", "").replace("__dict__.", "")
    return body.rstrip("_")
