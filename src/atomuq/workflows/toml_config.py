"""TOML tables to frozen dataclasses: one binder for every configuration file (`atomuq train`, `atomuq improve`).

`bind(cls, table, ...)` reads each key of a table into the field of that name, with the field's
type hint deciding what is accepted: bool, int, float (finite; an int is taken), str, Path
(relative to the config file's folder), tuple[X, ...] (a TOML array; a single string for a
path list), X | None, Literal[...], a nested dataclass (a sub-table) and dict (a free table).
A field may bind itself: `field(metadata={"toml": hook})` with hook(value, at) -> value, and
`metadata={"toml": False}` keeps a field out of the file (set by code, e.g. the file's name).

Every error is a ConfigError naming the file, the key as a dotted path (`optimizer.lr`, as it
could be written in TOML) and what was wrong: an unknown key with the closest known one
("did you mean"), a wrong type (`optimizer.lr: expected float, got 'fast' (str)`), a missing
required key, a value the dataclass refused. Checks in a dataclass's __post_init__ raise
FieldError(field, reason) so that the binder can name the field with its full path; the CLI
maps ConfigError.field back to the flag that set it, when a flag did.

pydantic was considered and not used: its messages need the same rewriting to name the file and
suggest keys, and the configuration dataclasses stay plain (frozen, hashable, `dataclasses.replace`).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from atomuq.core.errors import AtomuqError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class ConfigError(AtomuqError):
    """A configuration that cannot be used; the message names the file and the key.

    source: the file (None for a dict built in code: the message then starts with the key); field: dotted key
    path or None; reason: what is wrong with it, phrased to follow the key (separator: between the two in the
    message; None when the reason names the key itself).
    """

    def __init__(self, reason: str, *, source: str | Path | None = None, field: str | None = None,
                 separator: str | None = ": ") -> None:
        self.source = None if source is None else str(source)
        self.field = field or None
        self.reason = reason
        where = f"{self.field}{separator}" if self.field and separator is not None else ""
        super().__init__(f"{self.source}: {where}{reason}" if self.source else f"{where}{reason}")


class FieldError(ValueError):
    """Raised by a configuration dataclass's checks: which field (relative to the dataclass; '' for the whole
    table) and why, phrased to follow the key ('must be >= 1, got 0')."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"{field} {reason}" if field else reason)


@dataclass(frozen=True)
class At:
    """Where a value is being bound: the file, the folder relative paths start from, the dotted key path."""

    source: str | None
    base: Path
    path: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The dotted key path ('optimizer.lr'); '' at the top level."""
        return ".".join(self.path)

    def child(self, name: str) -> "At":
        """The location of key `name` inside this table."""
        return dataclasses.replace(self, path=self.path + (name,))

    def item(self, index: int) -> "At":
        """The location of element index of this array ('files[2]')."""
        name = f"{self.path[-1]}[{index}]" if self.path else f"[{index}]"
        return dataclasses.replace(self, path=self.path[:-1] + (name,))

    def error(self, reason: str, separator: str = ": ") -> ConfigError:
        """A ConfigError about this key."""
        return ConfigError(reason, source=self.source, field=self.key, separator=separator)

    def unknown(self, key: str, known: Sequence[str]) -> ConfigError:
        """A ConfigError for an unknown key of this table, with the closest known key and the list."""
        return unknown_key(key, known, self)


def unknown_key(key: str, known: Sequence[str], at: At) -> ConfigError:
    """'unknown key 'loss.energi' (did you mean 'loss.energy'?); known keys in [loss]: ...'."""
    prefix = f"{at.key}." if at.key else ""
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    section = f" in [{at.key}]" if at.key else ""
    return ConfigError(f"unknown key '{prefix}{key}'{hint}; known keys{section}: {', '.join(sorted(known))}",
                       source=at.source, field=f"{prefix}{key}", separator=None)


def read_toml(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML file; ConfigError naming the file when it is missing, a folder or not TOML."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError("is a folder; give the TOML config file", source=path)
    if not path.is_file():
        raise ConfigError("config file not found", source=path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not valid TOML ({exc})", source=path) from exc


def with_overrides(table: Mapping[str, Any], overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of table with dotted keys ('optimizer.lr') set to the override values (None values skipped)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in table.items()}
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        *parents, name = dotted.split(".")
        node = out
        for part in parents:
            node[part] = dict(node.get(part, {})) if isinstance(node.get(part, {}), dict) else {}
            node = node[part]
        node[name] = value
    return out


def toml_fields(cls: type) -> list[dataclasses.Field]:
    """The fields of a configuration dataclass that a TOML table may set."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("toml", True) is not False]


def bind(cls: type, table: Any, *, source: str | Path | None = None, base: str | Path = ".",
         prefix: str = "", extra: Mapping[str, Any] | None = None) -> Any:
    """An instance of dataclass cls from a TOML table; relative paths start at base; errors name source and keys.

    prefix: dotted path of the table in the file ('finetune.'), for messages; extra: fields set by code.
    """
    at = At(None if source is None else str(source), Path(base).resolve(), tuple(p for p in prefix.split(".") if p))
    return bind_at(cls, table, at, extra)


def bind_at(cls: type, table: Any, at: At, extra: Mapping[str, Any] | None = None) -> Any:
    """bind() at a known location (for hooks binding sub-tables)."""
    if not isinstance(table, dict):
        raise at.error(f"expected a table, got {_shown(table)}")
    specs = {f.name: f for f in toml_fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        if key not in specs:
            raise at.unknown(key, list(specs))
        hook = specs[key].metadata.get("toml", True)
        here = at.child(key)
        kwargs[key] = hook(value, here) if callable(hook) else coerce(value, hints[key], here)
    missing = [name for name, f in specs.items()
               if name not in kwargs and f.default is MISSING and f.default_factory is MISSING]
    if missing:
        prefix = f"{at.key}." if at.key else ""
        raise ConfigError(f"missing required key{'s' if len(missing) > 1 else ''} {', '.join(prefix + m for m in missing)}",
                          source=at.source, field=prefix + missing[0], separator=None)
    kwargs.update(extra or {})
    try:
        return cls(**kwargs)
    except FieldError as exc:
        where = at.child(exc.field) if exc.field else at
        raise where.error(exc.reason, separator=" " if exc.field else ": ") from None
    except ConfigError:
        raise
    except (ValueError, TypeError) as exc:
        raise (at.error(str(exc)) if at.key else ConfigError(str(exc), source=at.source)) from None


_NAMES = {bool: "true or false", int: "int", float: "float", str: "a string", Path: "a path (string)"}


def describe(kind: Any) -> str:
    """How a type hint reads in a message ('int', 'a list of paths', ...)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind in _NAMES:
        return _NAMES[kind]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args if a is not type(None))
    if origin is tuple:
        inner = describe(args[0])
        return "a list of paths" if args[0] is Path else f"a list of {inner}"
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if dataclasses.is_dataclass(kind) or origin is dict or kind is dict:
        return "a table"
    return str(kind)


def _shown(value: Any) -> str:
    kind = {dict: "table", list: "array"}.get(type(value), type(value).__name__)
    return f"{value!r} ({kind})"


def coerce(value: Any, kind: Any, at: At) -> Any:
    """value checked against (and converted to) the type hint kind; ConfigError naming the key otherwise."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        for option in options:
            try:
                return coerce(value, option, at)
            except ConfigError:
                if len(options) == 1:
                    raise
        raise at.error(f"expected {describe(kind)}, got {_shown(value)}")
    bad = at.error(f"expected {describe(kind)}, got {_shown(value)}")
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if not math.isfinite(value):
            raise at.error(f"must be finite, got {value}")
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise bad
        return value
    if kind is Path:
        if not isinstance(value, (str, Path)) or not str(value):
            raise bad
        return (at.base / Path(value).expanduser()).resolve()
    if origin is tuple:
        items = [value] if args[0] is Path and isinstance(value, (str, Path)) else value
        if not isinstance(items, (list, tuple)):
            raise bad
        return tuple(coerce(v, args[0], at.item(k)) for k, v in enumerate(items))
    if origin is typing.Literal:
        if value not in args:
            raise bad
        return value
    if dataclasses.is_dataclass(kind):
        return bind_at(kind, value, at)
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    raise TypeError(f"{at.key}: the binder does not know the type {kind}")  # pragma: no cover - a programming error


def to_jsonable(value: Any) -> Any:
    """A JSON-ready copy: dataclasses (their TOML fields) as dicts, paths as strings, tuples as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in toml_fields(type(value))}
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: to_jsonable(v) for k, v in value.items()}
    return value


def field_defaults(cls: type) -> dict[str, Any]:
    """JSON-ready defaults of a configuration dataclass's fields (nested dataclasses too); required fields left out."""
    out: dict[str, Any] = {}
    hints = typing.get_type_hints(cls)
    for f in toml_fields(cls):
        if f.default is not MISSING:
            out[f.name] = to_jsonable(f.default)
        elif f.default_factory is not MISSING:
            out[f.name] = to_jsonable(f.default_factory())
        elif dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = field_defaults(hints[f.name])
    return out


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "",
                defaults: Mapping[str, Any] | None = None) -> list[str]:
    """'key: old -> new' for every dotted key whose value differs; a key missing from old (added to the format
    later) counts as its default there, when defaults has one."""
    diffs = []
    defaults = defaults or {}
    for key in sorted(set(old) | set(new)):
        a = old[key] if key in old else defaults.get(key)
        b = new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = defaults.get(key) if isinstance(defaults.get(key), dict) else None
            diffs += differences(a, b, f"{prefix}{key}.", sub)
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return diffs


Hook = Callable[[Any, At], Any]
