"""Intervention kinds by name, and the text specs the CLI speaks.

Why: a sweep or a CLI call should be able to say ``ablate-mlp:layer=3,positions=5`` and get the
same frozen object a notebook would build by hand, and every result should be able to store
the exact intervention as one line of text. :func:`parse_spec` and :func:`spec` are inverses:
``parse_spec(spec(x)) == x`` for every registered kind.

Grammar
-------
::

    specs      := spec ( ("+" | ";") spec )*        several specs compose, in order
    spec       := kind [ ":" assignment ( "," assignment )* ]
    assignment := field "=" value
    value      := item ( "|" item )*               a list; only for list-typed fields
    item       := a-b                              inclusive integer range (list of int fields)
                | number | true | false | none
                | bare-word                        anything but , | ; + = " and spaces at the ends
                | "quoted string"                  \\" and \\\\ escape inside quotes
                | @path                            (lists of texts) one text per paragraph of a
                                                   file, as circuits.probes.read_prompts_file

Values are converted with the dataclass field's type: ``int``, ``float``, ``bool``, ``str``,
``Literal[...]``, ``tuple[X, ...]`` (a single item is a one-element list) and ``X | None``.
Singular field names stand for plural ones (``layer=3`` sets ``layers``, ``query=5`` sets
``queries``). A ``+`` inside a number's exponent (``1e+3``) does not split specs.

Examples::

    ablate-mlp:layers=3-5,positions=5|6,mode=mean
    rescale-sink:layer=4,target_norm=0,min_cos=0.98,scope=whole
    isolate:layers=0-3,queries=7 + amplify-variance:layer=2,positions=7,factor=4

Adding a kind: decorate a frozen dataclass subclass of
:class:`~interventions.base.Intervention` with ``@register("my-kind")``.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
from typing import Any, Callable, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from circuits.probes import TokenizationError, read_prompts_file
from interventions.base import Compose, Intervention, InterventionError

KINDS: dict[str, type[Intervention]] = {}

_KIND_RE = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_BUILTIN_MODULES = (
    "interventions.mlp", "interventions.attention", "interventions.residual", "interventions.keybias",
)
_BARE_RE = re.compile(r"^[A-Za-z0-9_.\-/]+$")
_INT_RE = re.compile(r"^[+-]?\d+$")
_RANGE_RE = re.compile(r"^(\d+)-(\d+)$")

T = TypeVar("T", bound=type)


class SpecError(InterventionError):
    """A text spec cannot be parsed: unknown kind or field, missing field, or a bad value."""


def register(kind: str) -> Callable[[T], T]:
    """Class decorator: make a frozen ``Intervention`` dataclass available as ``kind`` in specs."""
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise ValueError(f"an intervention kind is lower-case words joined by '-', e.g. 'ablate-mlp'; got {kind!r}")

    def decorate(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, Intervention)):
            raise TypeError(f"@register({kind!r}) needs a subclass of Intervention, got {cls!r}")
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"@register({kind!r}): {cls.__name__} must be a @dataclass(frozen=True)")
        old = KINDS.get(kind)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"intervention kind {kind!r} is already registered by {old.__module__}.{old.__qualname__}")
        cls.kind = kind
        KINDS[kind] = cls
        return cls

    return decorate


def unregister(kind: str) -> None:
    """Forget a kind (for tests and interactive sessions)."""
    KINDS.pop(kind, None)


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def known_kinds() -> list[str]:
    _load_builtins()
    return sorted(KINDS)


def get_kind(kind: str) -> type[Intervention]:
    _load_builtins()
    try:
        return KINDS[kind]
    except KeyError:
        raise SpecError(f"unknown intervention kind {kind!r}; known kinds: {', '.join(sorted(KINDS))}") from None


def describe(kind: str) -> str:
    """One line per field of ``kind``: name, type and default (for CLI help)."""
    cls = get_kind(kind)
    hints = get_type_hints(cls)
    lines = [f"{kind}: {(cls.__doc__ or '').strip().splitlines()[0] if cls.__doc__ else cls.__name__}"]
    for f in _init_fields(cls):
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"default {_format_value(hints[f.name], default)}"
        lines.append(f"  {f.name}: {_type_name(hints[f.name])} ({shown})")
    return "\n".join(lines)


# --------------------------------------------------------------------------- lexing


@dataclasses.dataclass(frozen=True)
class _Item:
    text: str
    quoted: bool


def _split_top(text: str, seps: str, *, plus: bool = False) -> list[str]:
    """Split on any character of ``seps`` outside double quotes; ``plus`` also splits on '+'
    unless it is a number's exponent sign."""
    parts, buf, quoted, i = [], [], False, 0
    while i < len(text):
        ch = text[i]
        if quoted:
            buf.append(ch)
            if ch == "\\" and i + 1 < len(text):
                buf.append(text[i + 1])
                i += 1
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            buf.append(ch)
        elif ch in seps or (plus and ch == "+" and not _is_exponent(text, i)):
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
        i += 1
    if quoted:
        raise SpecError(f"unterminated quoted string in {text!r}")
    parts.append("".join(buf))
    return parts


def _is_exponent(text: str, i: int) -> bool:
    return i >= 2 and text[i - 1] in "eE" and (text[i - 2].isdigit() or text[i - 2] == ".") and i + 1 < len(text) and text[i + 1].isdigit()


def _item(raw: str, where: str) -> _Item:
    raw = raw.strip()
    if raw.startswith('"'):
        if len(raw) < 2 or not raw.endswith('"'):
            raise SpecError(f"{where}: badly quoted value {raw!r}")
        body, out, i = raw[1:-1], [], 0
        while i < len(body):
            if body[i] == "\\" and i + 1 < len(body):
                out.append(body[i + 1])
                i += 2
            elif body[i] == '"':
                raise SpecError(f"{where}: stray quote in {raw!r}; escape it as \\\"")
            else:
                out.append(body[i])
                i += 1
        return _Item("".join(out), True)
    if '"' in raw:
        raise SpecError(f"{where}: a quote may only open a value: {raw!r}")
    if not raw:
        raise SpecError(f"{where}: empty value")
    return _Item(raw, False)


# --------------------------------------------------------------------------- parsing


def parse_spec(text: str) -> Intervention:
    """Parse one spec, or several joined by ``+`` or ``;`` (then a :class:`Compose`)."""
    if not isinstance(text, str):
        raise SpecError(f"an intervention spec must be a text (str), e.g. 'ablate-mlp:layer=3,positions=5'; "
                        f"got {text!r} ({type(text).__name__})")
    if not text.strip():
        raise SpecError("empty intervention spec; expected e.g. 'ablate-mlp:layer=3,positions=5'")
    pieces = [p.strip() for p in _split_top(text, ";", plus=True)]
    if any(not p for p in pieces):
        raise SpecError(f"empty part in intervention spec {text!r} (two separators in a row?)")
    parsed = [_parse_one(p) for p in pieces]
    return parsed[0] if len(parsed) == 1 else Compose(tuple(parsed))


def _parse_one(text: str) -> Intervention:
    kind, _, body = text.partition(":")
    kind = kind.strip()
    cls = get_kind(kind)
    fields = {f.name: f for f in _init_fields(cls)}
    hints = get_type_hints(cls)
    values: dict[str, Any] = {}
    if body.strip():
        for assignment in _split_top(body, ","):
            if not assignment.strip():
                raise SpecError(f"{kind}: empty assignment in {text!r} (a stray comma?)")
            key, eq, raw = assignment.partition("=")
            key = key.strip()
            if not eq:
                raise SpecError(f"{kind}: expected field=value, got {assignment.strip()!r}")
            name = _resolve_field(kind, key, fields)
            if name in values:
                raise SpecError(f"{kind}: field {name!r} is given twice")
            items = [_item(r, f"{kind}.{name}") for r in _split_top(raw, "|")]
            values[name] = _convert(hints[name], items, f"{kind}.{name}")
    missing = [n for n, f in fields.items() if _default(f) is dataclasses.MISSING and n not in values]
    if missing:
        raise SpecError(f"{kind}: missing required field(s) {', '.join(missing)}; fields: {', '.join(fields)}")
    try:
        return cls(**values)
    except InterventionError:
        raise
    except (TypeError, ValueError) as exc:
        raise SpecError(f"{kind}: {exc}") from exc


def _resolve_field(kind: str, key: str, fields: dict) -> str:
    if key in fields:
        return key
    candidates = [key + "s", key + "es", key[:-1] + "ies" if key.endswith("y") else None]
    if key.endswith("ies"):
        candidates.append(key[:-3] + "y")
    elif key.endswith("s"):
        candidates.append(key[:-1])
    for c in candidates:
        if c and c in fields:
            return c
    raise SpecError(f"{kind}: unknown field {key!r}; fields: {', '.join(fields)}")


def _init_fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.init]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def _is_optional(tp) -> tuple[bool, Any]:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) < len(get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def _is_list(tp) -> tuple[bool, Any]:
    if get_origin(tp) is tuple:
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return True, args[0]
    return False, tp


def _convert(tp, items: list[_Item], where: str) -> Any:
    optional, inner = _is_optional(tp)
    if optional and len(items) == 1 and not items[0].quoted and items[0].text.lower() in ("none", "null"):
        return None
    is_list, elem = _is_list(inner)
    if is_list:
        out: list = []
        for item in items:
            if elem is str and not item.quoted and item.text.startswith("@"):
                out.extend(_read_texts(item.text[1:], where))
            elif elem is int and not item.quoted and _RANGE_RE.match(item.text):
                a, b = map(int, _RANGE_RE.match(item.text).groups())
                if b < a:
                    raise SpecError(f"{where}: range {item.text!r} runs backwards; write {b}-{a}")
                out.extend(range(a, b + 1))
            else:
                out.append(_scalar(elem, item, where))
        return tuple(out)
    if len(items) != 1:
        raise SpecError(f"{where}: takes one value, got {len(items)} ({'|'.join(i.text for i in items)})")
    return _scalar(inner, items[0], where)


def _scalar(tp, item: _Item, where: str) -> Any:
    text = item.text
    if get_origin(tp) is Literal:
        choices = get_args(tp)
        if text not in choices:
            raise SpecError(f"{where}: must be one of {', '.join(map(str, choices))}; got {text!r}")
        return text
    if tp is str:
        return text
    if item.quoted:
        raise SpecError(f"{where}: expected {_type_name(tp)}, got the quoted string {text!r}")
    if tp is bool:
        low = text.lower()
        if low in ("true", "yes", "1", "on"):
            return True
        if low in ("false", "no", "0", "off"):
            return False
        raise SpecError(f"{where}: expected true or false, got {text!r}")
    if tp is int:
        if not _INT_RE.match(text):
            raise SpecError(f"{where}: expected an integer, got {text!r}")
        return int(text)
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise SpecError(f"{where}: expected a number, got {text!r}") from None
    raise SpecError(f"{where}: a field of type {_type_name(tp)} cannot be set from a spec")


def _read_texts(path: str, where: str) -> list[str]:
    try:
        return read_prompts_file(path)
    except TokenizationError as exc:
        raise SpecError(f"{where}: {exc}") from exc


def _type_name(tp) -> str:
    if get_origin(tp) is Literal:
        return "|".join(map(str, get_args(tp)))
    optional, inner = _is_optional(tp)
    if optional:
        return f"{_type_name(inner)} or none"
    is_list, elem = _is_list(tp)
    if is_list:
        return f"list of {_type_name(elem)}"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- formatting


def spec(intervention: Intervention) -> str:
    """The text spec of an intervention: fields that differ from their defaults, in order."""
    if isinstance(intervention, Compose):
        return " + ".join(spec(p) for p in intervention.parts)
    cls = type(intervention)
    if KINDS.get(cls.kind) is not cls:
        raise SpecError(f"{cls.__name__} is not a registered kind; decorate it with @register(...)")
    hints = get_type_hints(cls)
    parts = []
    for f in _init_fields(cls):
        value = getattr(intervention, f.name)
        default = _default(f)
        if default is not dataclasses.MISSING and _same(value, default):
            continue
        parts.append(f"{f.name}={_format_value(hints[f.name], value)}")
    return cls.kind + (":" + ",".join(parts) if parts else "")


def _same(a: Any, b: Any) -> bool:
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def _format_value(tp, value: Any) -> str:
    if value is None:
        return "none"
    _, inner = _is_optional(tp)
    is_list, elem = _is_list(inner)
    if is_list:
        if elem is int:
            return _format_ints(list(value))
        return "|".join(_format_scalar(v) for v in value)
    return _format_scalar(value)


def _format_ints(values: list[int]) -> str:
    out, i = [], 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        out.append(f"{values[i]}-{values[j]}" if j - i >= 2 else "|".join(map(str, values[i : j + 1])))
        i = j + 1
    return "|".join(out)


def _format_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _BARE_RE.match(text) and text.lower() not in ("none", "null", "true", "false") and not text.startswith("@"):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = [
    "KINDS",
    "SpecError",
    "describe",
    "get_kind",
    "known_kinds",
    "parse_spec",
    "register",
    "spec",
    "unregister",
]
