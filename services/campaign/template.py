"""SMS body and task-note templates: ``{{contact.first_name|default:"there"}}``, ``{{event.cart_id}}``."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_TAG = re.compile(r"\{\{(.*?)\}\}", re.S)
_PATH = re.compile(r"^(contact|event)((?:\.[A-Za-z_][A-Za-z0-9_\-]*)+)$")
_FILTER = re.compile(r'^([a-z_]+)(?::\s*("(?:[^"\\]|\\.)*"|-?\d+(?:\.\d+)?))?$')
_FILTERS: dict[str, Callable[[str, str | None], str]] = {
    "upper": lambda v, _a: v.upper(),
    "lower": lambda v, _a: v.lower(),
    "title": lambda v, _a: v.title(),
    "default": lambda v, a: v if v != "" else (a or ""),
}


class TemplateError(ValueError):
    """A template that does not parse; the message says where."""


@dataclass(frozen=True)
class _Field:
    root: str
    path: tuple[str, ...]
    filters: tuple[tuple[str, str | None], ...]


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and fields, alternating."""

    parts: tuple[str | _Field, ...]

    def render(self, contact: Mapping[str, Any], event: Mapping[str, Any]) -> str:
        out: list[str] = []
        for part in self.parts:
            if isinstance(part, str):
                out.append(part)
                continue
            value = lookup(contact if part.root == "contact" else event, part.path)
            text = _to_text(value)
            for name, arg in part.filters:
                text = _FILTERS[name](text, arg)
            out.append(text)
        return "".join(out)


def _to_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def lookup(data: Mapping[str, Any], path: tuple[str, ...] | list[str]) -> Any:
    """Follow a dotted path into nested mappings; None when any part is missing."""
    cur: Any = data
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def parse(text: str) -> Template:
    """Parse a template; TemplateError names the first bad field and its offset."""
    parts: list[str | _Field] = []
    pos = 0
    for m in _TAG.finditer(text):
        literal = text[pos : m.start()]
        if "{{" in literal or "}}" in literal:
            raise TemplateError(f"unbalanced braces at offset {pos + literal.find('{{' if '{{' in literal else '}}')}")
        parts.append(literal)
        parts.append(_parse_field(m.group(1), m.start()))
        pos = m.end()
    tail = text[pos:]
    if "{{" in tail:
        raise TemplateError(f"unclosed '{{{{' at offset {pos + tail.find('{{')}")
    if "}}" in tail:
        raise TemplateError(f"unopened '}}}}' at offset {pos + tail.find('}}')}")
    parts.append(tail)
    return Template(tuple(p for p in parts if p != ""))


def _parse_field(expr: str, offset: int) -> _Field:
    pieces = _split_pipes(expr)
    head = pieces[0].strip()
    m = _PATH.match(head)
    if not m:
        raise TemplateError(f"bad field {head!r} at offset {offset}: use contact.<property> or event.<property>")
    filters: list[tuple[str, str | None]] = []
    for raw in pieces[1:]:
        fm = _FILTER.match(raw.strip())
        if not fm or fm.group(1) not in _FILTERS:
            raise TemplateError(f"unknown filter {raw.strip()!r} at offset {offset} (known: {', '.join(_FILTERS)})")
        arg = fm.group(2)
        if arg is not None and arg.startswith('"'):
            arg = json.loads(arg)
        if fm.group(1) == "default" and arg is None:
            raise TemplateError(f'default needs a value at offset {offset}, e.g. default:"there"')
        filters.append((fm.group(1), arg))
    return _Field(m.group(1), tuple(m.group(2)[1:].split(".")), tuple(filters))


def _split_pipes(expr: str) -> list[str]:
    # Split on | outside double quotes, so default:"a|b" keeps its bar.
    out, cur, quoted, escaped = [], [], False, False
    for ch in expr:
        if escaped:
            cur.append(ch)
            escaped = False
        elif ch == "\\" and quoted:
            cur.append(ch)
            escaped = True
        elif ch == '"':
            cur.append(ch)
            quoted = not quoted
        elif ch == "|" and not quoted:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return out
