"""The one TOML binder (workflows/toml_config.py): types from the dataclasses, errors naming file and key."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest

from atomuq.workflows.improve_config import ImproveConfig
from atomuq.workflows.toml_config import (ConfigError, FieldError, bind, differences, field_defaults, read_toml,
                                          to_jsonable, with_overrides)


@dataclass(frozen=True)
class Inner:
    rate: float = 1.0
    steps: int = 3

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise FieldError("rate", f"must be positive, got {self.rate}")
        if self.steps > 100:
            raise FieldError("", "too many steps for this rate")


@dataclass(frozen=True)
class Outer:
    name: str
    files: tuple[Path, ...] = ()
    out: Path | None = None
    flag: bool = False
    kind: Literal["a", "b"] = "a"
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    free: dict[str, Any] = field(default_factory=dict)
    origin: str | None = field(default=None, metadata={"toml": False})


def test_values_are_bound_by_their_type_hints(tmp_path):
    value = bind(Outer, {"name": "x", "files": "a.xyz", "out": "../o", "flag": True, "kind": "b", "limit": 4,
                         "inner": {"rate": 2, "steps": 5}, "free": {"k": [1]}}, source="c.toml", base=tmp_path)
    assert value.files == (tmp_path / "a.xyz",) and value.out == (tmp_path / "../o").resolve()
    assert value.inner == Inner(rate=2.0, steps=5) and isinstance(value.inner.rate, float)
    assert value.flag is True and value.kind == "b" and value.limit == 4 and value.free == {"k": [1]}
    files = bind(Outer, {"name": "x", "files": ["a", "b"]}, base=tmp_path).files
    assert files == (tmp_path / "a", tmp_path / "b")
    assert bind(Outer, {"name": "x"}, extra={"origin": "code"}).origin == "code"


@pytest.mark.parametrize("table, message", [
    ({"name": 3}, "c.toml: name: expected a string, got 3 (int)"),
    ({"name": "x", "flag": 1}, "c.toml: flag: expected true or false, got 1 (int)"),
    ({"name": "x", "limit": 2.0}, "c.toml: limit: expected int, got 2.0 (float)"),
    ({"name": "x", "limit": True}, "c.toml: limit: expected int, got True (bool)"),
    ({"name": "x", "files": [1]}, "c.toml: files[0]: expected a path (string), got 1 (int)"),
    ({"name": "x", "files": 1}, "c.toml: files: expected a list of paths, got 1 (int)"),
    ({"name": "x", "kind": "c"}, "c.toml: kind: expected one of 'a', 'b', got 'c' (str)"),
    ({"name": "x", "inner": 2}, "c.toml: inner: expected a table, got 2 (int)"),
    ({"name": "x", "inner": {"rate": "fast"}}, "c.toml: inner.rate: expected float, got 'fast' (str)"),
    ({"name": "x", "inner": {"rate": float("inf")}}, "c.toml: inner.rate: must be finite, got inf"),
    ({"name": "x", "inner": {"rate": -1.0}}, "c.toml: inner.rate must be positive, got -1.0"),
    ({"name": "x", "inner": {"steps": 101}}, "c.toml: inner: too many steps for this rate"),
    ({"name": "x", "inner": {"rtae": 1.0}}, "c.toml: unknown key 'inner.rtae' (did you mean 'inner.rate'?); "
                                          "known keys in [inner]: rate, steps"),
    ({"nmae": "x"}, "c.toml: unknown key 'nmae' (did you mean 'name'?)"),
    ({"name": "x", "origin": "toml"}, "c.toml: unknown key 'origin'"),
    ({}, "c.toml: missing required key name"),
])
def test_errors_name_the_file_and_the_dotted_key(table, message):
    with pytest.raises(ConfigError) as info:
        bind(Outer, table, source="c.toml")
    assert str(info.value).startswith(message), str(info.value)


def test_prefix_and_fields_of_errors():
    with pytest.raises(ConfigError) as info:
        bind(Inner, {"rate": 0.0}, source="c.toml", prefix="finetune.optimizer.")
    assert str(info.value) == "c.toml: finetune.optimizer.rate must be positive, got 0.0"
    assert info.value.field == "finetune.optimizer.rate" and info.value.reason == "must be positive, got 0.0"
    with pytest.raises(ConfigError) as info:
        bind(Inner, {"rate": "x"})
    assert str(info.value) == "rate: expected float, got 'x' (str)"  # no file: the message starts with the key


def test_read_toml_and_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('name = "x"\n[inner]\nrate = 2.0\n')
    table = with_overrides(read_toml(path), {"inner.steps": 7, "name": None, "new.deep.key": 1})
    assert table == {"name": "x", "inner": {"rate": 2.0, "steps": 7}, "new": {"deep": {"key": 1}}}
    assert read_toml(path) == {"name": "x", "inner": {"rate": 2.0}}  # the file's table is not changed
    with pytest.raises(ConfigError, match="is a folder"):
        read_toml(tmp_path)
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="c.toml: not valid TOML"):
        read_toml(path)


def test_json_defaults_and_differences(tmp_path):
    value = bind(Outer, {"name": "x", "files": ["a"]}, base=tmp_path)
    data = to_jsonable(value)
    assert data["files"] == [str(tmp_path / "a")] and data["inner"] == {"rate": 1.0, "steps": 3}
    assert "origin" not in data
    defaults = field_defaults(Outer)
    assert "name" not in defaults and defaults["inner"] == {"rate": 1.0, "steps": 3} and defaults["limit"] is None
    older = {k: v for k, v in data.items() if k != "limit"}
    older["inner"] = {"rate": 1.0}
    assert differences(older, data, defaults=defaults) == []
    changed = {**data, "limit": 3, "inner": {"rate": 2.0, "steps": 3}}
    assert differences(older, changed, defaults=defaults) == ["inner.rate: 1.0 -> 2.0", "limit: None -> 3"]


IMPROVE = """
run_dir = "loop"
model = "model.pt"
[search]
starts = ["s.extxyz"]
[finetune]
epochs = 2
"""


@pytest.mark.parametrize("old, new, message", [
    ("epochs = 2", "epochz = 2", "unknown key 'finetune.epochz' (did you mean 'finetune.epochs'?)"),
    ("epochs = 2", "epochs = 2\nloss = 1", "finetune.loss: expected a table, got 1"),
    ("epochs = 2", "epochs = 0", "finetune.epochs must be >= 1, got 0"),
    ("epochs = 2", "epochs = 2\n[finetune.optimizer]\nlr = 'x'", "finetune.optimizer.lr: expected float, got 'x'"),
    ("[finetune]", "[select]\nmax_selected = 0\n[finetune]", "select: max_selected must be at least 1"),
    ('starts = ["s.extxyz"]', 'starts = ["s.extxyz"]\nkT = "hot"', "search.kT: expected float, got 'hot'"),
    ('starts = ["s.extxyz"]', 'starts = ["s.extxyz"]\nstepz = 3', "unknown key 'search.stepz' (did you mean 'search.steps'?)"),
])
def test_improve_config_uses_the_same_binder(tmp_path, old, new, message):
    path = tmp_path / "improve.toml"
    path.write_text(IMPROVE.replace(old, new))
    with pytest.raises(ConfigError) as info:
        ImproveConfig.from_toml(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value), str(info.value)
