"""A refused configuration, one mistake a line: ``FILE: KEY: message (allowed: ...)``.

:class:`Problem` is one mistake and :class:`ConfigError` all of a file's; :func:`custom` is how the
schema's own validators speak (a message and what is allowed, like the built-in checks), and
:func:`validation_problems` turns pydantic's errors into problems. Pydantic's details say what went
wrong (the type of error, its ``ctx``: the bound, the choices, the tag); the schema itself is asked
only for what they lack: the keys a section takes, and both ends of a key's range.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticCustomError

__all__ = ["Problem", "ConfigError", "custom", "near", "show", "validation_problems"]


@dataclass(frozen=True)
class Problem:
    key: str
    message: str
    allowed: str = ""

    def format(self, source: str) -> str:
        where = f"{source}: {self.key}" if self.key else source
        return f"{where}: {self.message}" + (f" (allowed: {self.allowed})" if self.allowed else "")


class ConfigError(ValueError):
    """A configuration was refused; ``problems`` lists every mistake found, each with its key."""

    def __init__(self, source: str, problems: Sequence[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(p.format(source) for p in self.problems))

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.problems]


def custom(message: str, allowed: str = "") -> PydanticCustomError:
    """What a validator of the schema raises: it reads as the built-in checks do, a message and what is allowed."""
    return PydanticCustomError("config", "{message}", {"message": message, "allowed": allowed})


def near(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(str(word), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# -- pydantic's errors in the lab's words ----------------------------------------------------------------------

_TYPE_WORDS = {
    "int": "an integer", "float": "a number", "bool": "true or false", "string": "a string", "str": "a string",
    "dict": "a mapping (key: value)", "list": "a list",
}
_BOUND_KINDS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def validation_problems(errors: Sequence[Mapping[str, Any]], data: Any, root: type[BaseModel]) -> list[Problem]:
    """One :class:`Problem` per error of ``root.model_validate(data)`` (``ValidationError.errors()``)."""
    return [_problem(err, data, root) for err in errors]


def _problem(err: Mapping[str, Any], data: Any, root: type[BaseModel]) -> Problem:
    loc = _strip_tags(err.get("loc", ()), data)
    key = ".".join(str(p) for p in loc)
    kind = err.get("type", "")
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == "config":
        return Problem(key, ctx.get("message", err.get("msg", "")), ctx.get("allowed", ""))
    if kind == "extra_forbidden":
        section = _section_at(root, loc[:-1], data)
        allowed = list(_keys(section)) if section else []
        return Problem(key, f"unknown key{near(str(loc[-1]), allowed)}", ", ".join(allowed))
    if kind == "missing":
        fld = _field_at(root, loc, data)
        return Problem(key, "missing required key", _describe(fld.annotation) if fld else "")
    if kind == "literal_error":
        return Problem(key, f"{show(value)} is not one of the choices", _choices(ctx.get("expected", "")))
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        tag = str(ctx.get("discriminator", "kind")).strip("'")
        if kind == "union_tag_invalid":
            what, allowed = f"unknown {tag} {ctx.get('tag')!r}", _choices(ctx.get("expected_tags", ""))
        else:
            what, allowed = f"missing key {tag!r}", ", ".join(_tags(_annotation_at(root, loc, data)[0], tag))
        return Problem(f"{key}.{tag}" if key else tag, what, allowed)
    if kind in _BOUND_KINDS:
        # both ends of the range, when the key has both (pydantic's context names the end that was passed)
        return Problem(key, f"out of range: {show(value)}", _range_text(_bounds_at(root, loc, data))
                       or _range_text(ctx))
    if kind == "finite_number":
        return Problem(key, f"not a finite number: {show(value)}",
                       _range_text(_bounds_at(root, loc, data)) or "a finite number")
    if kind in ("too_short", "string_too_short"):
        return Problem(key, f"too short: {show(value)}", f"at least {ctx.get('min_length', 1)} item(s)")
    if kind == "too_long":
        return Problem(key, f"too long: {ctx.get('actual_length', '?')} items", f"at most {ctx.get('max_length')}")
    for suffix in ("_type", "_parsing", "_from_float"):
        if kind.endswith(suffix):
            word = kind[: -len(suffix)]
            expected = _TYPE_WORDS.get(word, "")
            if not expected:  # a section or a driver: say which keys it takes
                fld = _field_at(root, loc, data) if loc else None
                expected = _describe(fld.annotation) if fld else word
            return Problem(key, f"wrong type: {show(value)} ({type(value).__name__})", expected)
    return Problem(key, f"{err.get('msg', 'invalid')}: {show(value)}")


def _choices(expected: str) -> str:
    """Pydantic's ``'a', 'b' or 'c'`` as ``a, b, c``."""
    return str(expected).replace(" or ", ", ").replace("'", "")


def _number(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


def _range_text(c: Mapping[str, Any]) -> str:
    low = f">= {_number(c['ge'])}" if "ge" in c else f"> {_number(c['gt'])}" if "gt" in c else ""
    high = f"<= {_number(c['le'])}" if "le" in c else f"< {_number(c['lt'])}" if "lt" in c else ""
    return " and ".join(t for t in (low, high) if t)


# -- where a key is in the schema ------------------------------------------------------------------------------


def _strip_tags(loc: Sequence[Any], data: Any) -> list[Any]:
    """Drop the discriminated-union tags pydantic puts in ``loc`` (they are values, not keys of the file)."""
    out: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, Mapping) and part not in node and node.get("kind") == part:
            continue
        out.append(part)
        node = _child(node, part)
    return out


def _child(node: Any, part: Any) -> Any:
    if isinstance(node, Mapping):
        return node.get(part)
    if isinstance(node, list) and isinstance(part, int) and part < len(node):
        return node[part]
    return None


def _keys(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """A section's fields by the key a file writes (``class``, not the attribute ``class_``)."""
    return {f.alias or name: f for name, f in model.model_fields.items()}


def _annotation_at(root: type[BaseModel], loc: Sequence[Any], data: Any) -> tuple[Any, Any]:
    """The schema's annotation of the key at ``loc`` (its bounds included) and the file's value there;
    ``None`` for the annotation where the schema has no such key."""
    ann: Any = root
    node = data
    for part in loc:
        ann = _unwrap(ann, node)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            fld = _keys(ann).get(part) if isinstance(part, str) else None
            if fld is None:
                return None, None
            # pydantic moves a field's own bounds out of its annotation, into its metadata
            ann = Annotated[(fld.annotation, *fld.metadata)] if fld.metadata else fld.annotation
        else:
            origin, args = typing.get_origin(ann), typing.get_args(ann)
            if origin in (list, tuple) and args:
                ann = args[0]
            elif origin is dict and len(args) == 2:
                ann = args[1]
            else:
                return None, None
        node = _child(node, part)
    return ann, node


def _section_at(root: type[BaseModel], loc: Sequence[Any], data: Any) -> type[BaseModel] | None:
    """The section class at ``loc`` (for the keys it takes); a driver is chosen by its ``kind``."""
    ann = _unwrap(*_annotation_at(root, loc, data))
    return ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None


def _field_at(root: type[BaseModel], loc: Sequence[Any], data: Any) -> FieldInfo | None:
    """The field of the section that holds the key at ``loc`` (none for an item of a list or a mapping)."""
    section = _section_at(root, loc[:-1], data) if loc else None
    return _keys(section).get(str(loc[-1])) if section else None


def _unwrap(ann: Any, node: Any) -> Any:
    while True:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            ann = typing.get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(ann) if a is not type(None)]
            tag = node.get("kind") if isinstance(node, Mapping) else None
            pick = [m for m in _models(members) if tag in _tags(m, "kind")]
            ann = pick[0] if pick else members[0] if len(members) == 1 else None
        else:
            return ann


def _models(members: Sequence[Any]) -> list[type[BaseModel]]:
    return [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]


def _tags(ann: Any, tag: str) -> tuple[Any, ...]:
    """The values of ``tag`` that choose a member of a discriminated union (or the one section ``ann``)."""
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if typing.get_origin(ann) in (Union, types.UnionType):
        return tuple(t for m in typing.get_args(ann) for t in _tags(m, tag))
    fld = ann.model_fields.get(tag) if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return typing.get_args(fld.annotation) if fld is not None and typing.get_origin(fld.annotation) is Literal else ()


def _bounds_at(root: type[BaseModel], loc: Sequence[Any], data: Any) -> dict[str, Any]:
    """The bounds (``ge``, ``gt``, ``le``, ``lt``) the schema puts on the key at ``loc``."""
    found: dict[str, Any] = {}

    def take(meta: Any) -> None:
        if isinstance(meta, FieldInfo):
            for m in meta.metadata:
                take(m)
            return
        for attr in ("gt", "ge", "lt", "le"):
            v = getattr(meta, attr, None)
            if v is not None:
                found.setdefault(attr, v)

    def visit(ann: Any) -> None:
        origin = typing.get_origin(ann)
        if origin is Annotated:
            base, *metas = typing.get_args(ann)
            for m in metas:
                take(m)
            visit(base)
        elif origin in (Union, types.UnionType):
            for a in typing.get_args(ann):
                visit(a)

    if loc:
        visit(_annotation_at(root, loc, data)[0])
    return found


def _describe(ann: Any) -> str:
    while typing.get_origin(ann) is Annotated:
        ann = typing.get_args(ann)[0]
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "a mapping with keys " + ", ".join(_keys(ann))
    origin = typing.get_origin(ann)
    if origin is Literal:
        return ", ".join(map(str, typing.get_args(ann)))
    if origin in (Union, types.UnionType):
        kinds = _tags(ann, "kind")
        if len(_models(typing.get_args(ann))) > 1 and kinds:  # a discriminated union: the driver
            return "a mapping with kind: " + ", ".join(kinds)
        return " or ".join(_describe(a) for a in typing.get_args(ann) if a is not type(None))
    return getattr(ann, "__name__", str(ann))
