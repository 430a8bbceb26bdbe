"""`hs-scale show-config --describe`: the resolved config as YAML with each field's description and default.

The descriptions are the attribute docstrings of the config dataclasses (the string literal under each field),
read from their source with `ast`: Python keeps no runtime record of attribute docstrings, and the dataclasses are
the one place each field is documented, so nothing is written twice.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap

import yaml


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: its attribute docstring} of dataclass `cls` and its dataclass bases ("" when undocumented)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen build): descriptions are optional
            continue
        body = tree.body[0].body
        for stmt, nxt in zip(body, body[1:] + [None], strict=True):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                is_doc = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) \
                    and isinstance(nxt.value.value, str)
                docs[stmt.target.id] = inspect.cleandoc(nxt.value.value) if is_doc else ""
    return docs


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _scalar(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def describe(cfg, width: int = 100) -> str:
    """YAML of every section of `cfg` (a resolved hs_scale Config): each field's description as comments above
    it, and `# default: X` after the value when the value is not the default."""
    lines: list[str] = []
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if value is None:
            continue
        lines.append(f"{section.name}:  # {type(value).__name__}")
        docs = field_docs(type(value))
        for f in dataclasses.fields(value):
            if f.name.startswith("_"):
                continue
            for doc_line in textwrap.wrap(" ".join(docs.get(f.name, "").split()), width - 4):
                lines.append(f"  # {doc_line}")
            current, default = getattr(value, f.name), _default(f)
            note = "" if current == default else f"  # default: {_scalar(default)}"
            lines.append(f"  {f.name}: {_scalar(current)}{note}")
        lines.append("")
    return "\n".join(lines)
