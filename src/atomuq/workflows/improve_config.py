"""Configuration of `atomuq improve CONFIG` (methods.md section 8), read by the TOML binder of `atomuq train`.

Top level: run_dir, model (bundled name or native model file to start from), generations,
device, tolerance (relative increase of an evaluation metric over the previous generation that
is flagged). Tables:

- [search]: starts (files), n_starts (drawn afresh each generation), batch_size and any
  AttackSettings key (objective, kT, steps, lr, ...; workflows/attack.py).
- [select]: SelectionSettings keys (percentile, rmsd_threshold, max_selected, max_energy_per_atom;
  the latter defaults to the search's energy budget).
- [label]: method (core/labelling.py: gfn2-xtb, emt, ...), workers, [label.options].
- [finetune]: mode ("direct": energy + direct-force loss; "conservative": energy + direct +
  conservative-force loss), replay_fraction (share of the fine-tuning set drawn from the replay
  files), replay (the original training files), accumulate (also train on earlier generations'
  structures) and any TrainConfig key except run_dir, data, init_from, model ([finetune.loss],
  [finetune.optimizer] as in configs/train_*.toml), plus validation_fraction.
- [evaluate]: test (labelled files: force MAEs per file), fresh_starts / fresh_n / fresh_steps /
  fresh_seed (a fixed adversarial search whose mean best U_Δ is reported), md_starts / md_n
  (fixed MD starting structures, equilibrated once with the starting model), temperature_K,
  equilibration_ps (conservative-force NVT), nve_ps, timestep_fs, max_temperature_K (a
  direct-force NVE run above it has failed), traj_every, batch_size.

Times in ps / fs, temperatures in K, energies in eV, lengths in Å.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomuq.core.errors import InputError
from atomuq.models.registry import bundled_models
from atomuq.workflows.attack import AttackSettings
from atomuq.workflows.selection import SelectionSettings
from atomuq.workflows.toml_config import At, ConfigError, FieldError, bind_at, read_toml, to_jsonable, toml_fields
from atomuq.workflows.train import TrainConfig

MODES = ("direct", "conservative")
_TABLES = ("search", "select", "label", "finetune", "evaluate")
#: TrainConfig keys the loop sets itself
_LOOP_TRAIN_KEYS = ("run_dir", "data", "init_from", "model")


@dataclass(frozen=True)
class SearchConfig:
    """Where the adversarial search starts: n_starts structures drawn (seed + generation) from the files."""

    starts: tuple[Path, ...]
    n_starts: int = 32
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.starts:
            raise FieldError("starts", "must name at least one file")
        for name in ("n_starts", "batch_size"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class LabelConfig:
    """Reference method (core/labelling.py) and worker processes (1: in this process)."""

    method: str = "gfn2-xtb"
    workers: int = 1

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise FieldError("workers", f"must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning mode and data mix; `train` holds the remaining TrainConfig keys ([finetune] table)."""

    mode: str = "conservative"
    replay_fraction: float = 0.0
    replay: tuple[Path, ...] = ()
    accumulate: bool = False
    validation_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FieldError("mode", f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not 0.0 <= self.replay_fraction < 1.0:
            raise FieldError("replay_fraction", f"must be in [0, 1), got {self.replay_fraction}")
        if self.replay_fraction > 0 and not self.replay:
            raise FieldError("replay_fraction", "> 0 needs finetune.replay (the original training files)")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise FieldError("validation_fraction", f"must be in [0, 1), got {self.validation_fraction}")


@dataclass(frozen=True)
class EvaluateConfig:
    """What each generation's model is measured on (see the module doc)."""

    test: tuple[Path, ...] = ()
    batch_size: int = 32
    fresh_starts: tuple[Path, ...] = ()
    fresh_n: int = 8
    fresh_steps: int = 50
    fresh_seed: int = 12345
    md_starts: tuple[Path, ...] = ()
    md_n: int = 2
    temperature_K: float = 300.0
    equilibration_ps: float = 0.5
    nve_ps: float = 1.0
    timestep_fs: float = 0.5
    max_temperature_K: float = 2000.0
    traj_every: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("batch_size", "fresh_n", "md_n", "traj_every"):
            if getattr(self, name) < 1:
                raise FieldError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.fresh_steps < 0:
            raise FieldError("fresh_steps", f"must be >= 0, got {self.fresh_steps}")
        for name in ("temperature_K", "nve_ps", "timestep_fs", "max_temperature_K"):
            if not getattr(self, name) > 0:
                raise FieldError(name, f"must be positive, got {getattr(self, name)}")
        if self.equilibration_ps < 0:
            raise FieldError("equilibration_ps", f"must be >= 0, got {self.equilibration_ps}")


@dataclass(frozen=True)
class ImproveConfig:
    """Everything `atomuq improve` needs; build it with ImproveConfig.from_toml(path)."""

    run_dir: Path
    search: SearchConfig
    model: str = "molecular-small"
    generations: int = 1
    device: str = "cpu"
    tolerance: float = 0.05
    attack: AttackSettings = field(default_factory=AttackSettings)
    select: SelectionSettings = field(default_factory=SelectionSettings)
    label: LabelConfig = field(default_factory=LabelConfig)
    label_options: dict[str, Any] = field(default_factory=dict)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys of [finetune]
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    source: Path | None = field(default=None, compare=False)
    base_dir: Path = field(default=Path("."), compare=False)

    @property
    def model_file(self) -> Path:
        """The native model file the first generation starts from (a bundled name resolved to its file)."""
        bundled = bundled_models()
        path = bundled.get(self.model) or (self.base_dir / Path(self.model).expanduser()).resolve()
        if not Path(path).is_file():
            raise InputError(
                f"model {self.model!r}: neither a bundled model ({', '.join(bundled) or 'none'}) nor a "
                "model file; `atomuq improve` fine-tunes native atomuq models only"
            )
        return Path(path)

    @property
    def select_settings(self) -> SelectionSettings:
        """Selection settings; the energy cap defaults to the search's energy budget (eV/atom)."""
        if self.select.max_energy_per_atom is None:
            return dataclasses.replace(self.select, max_energy_per_atom=self.attack.energy_budget)
        return self.select

    def loss_table(self) -> dict[str, Any]:
        """[finetune.loss] with the mode applied: direct sets conservative_forces = 0, conservative needs it > 0."""
        loss = dict(self.train.get("loss", {}))
        if self.finetune.mode == "direct":
            loss["conservative_forces"] = 0.0
        else:
            loss.setdefault("conservative_forces", 1.0)
        return loss

    def train_config(self, run_dir: Path, train_files: list[Path], init_from: Path) -> TrainConfig:
        """The TrainConfig of one fine-tuning run (validation split of the fine-tuning set, fixed seed)."""
        table = {
            **self.train,
            "loss": self.loss_table(),
            "run_dir": str(run_dir),
            "init_from": str(init_from),
            "data": {"train": [str(p) for p in train_files], "validation_fraction": self.finetune.validation_fraction},
        }
        table.setdefault("device", self.device)
        return TrainConfig.from_dict(table, base_dir=self.base_dir, source=self.source, prefix="finetune.")

    @classmethod
    def from_toml(cls, path: str | Path) -> "ImproveConfig":
        """Read a TOML config file; errors name the file and the bad key."""
        path = Path(path)
        return cls.from_dict(read_toml(path), base_dir=path.parent, source=path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | Path = ".", source: Path | None = None) -> "ImproveConfig":
        """Build from a nested dict (as TOML gives); relative paths are taken relative to base_dir."""
        at = At(None if source is None else str(source), Path(base_dir).resolve())
        data = dict(data)
        tables = {name: data.pop(name, {}) for name in _TABLES}
        for name, table in tables.items():
            if not isinstance(table, dict):
                raise at.child(name).error(f"expected a table, got {table!r}")
        if not tables["search"]:
            raise ConfigError("missing [search] table (at least search.starts)", source=source, field="search", separator=None)
        top = bind_at(_Top, data, at)
        search, attack = _split(tables["search"], (SearchConfig, AttackSettings), at.child("search"), skip={"seed"})
        label = dict(tables["label"])
        options = label.pop("options", {})
        if not isinstance(options, dict):
            raise at.child("label.options").error(f"expected a table, got {options!r}")
        finetune = dict(tables["finetune"])
        for key in _LOOP_TRAIN_KEYS:
            if key in finetune:
                raise ConfigError("is set by the improve loop; remove it", source=source, field=f"finetune.{key}",
                                  separator=" ")
        own, train = _split(finetune, (FinetuneConfig, TrainConfig), at.child("finetune"), skip=set(_LOOP_TRAIN_KEYS))
        for name in ("loss", "optimizer"):  # read by the mode checks before the fine-tuning table is bound
            if not isinstance(train.get(name, {}), dict):
                raise at.child(f"finetune.{name}").error(f"expected a table, got {train[name]!r}")
        try:
            config = cls(
                run_dir=top.run_dir,
                model=top.model,
                generations=top.generations,
                device=top.device,
                tolerance=top.tolerance,
                search=bind_at(SearchConfig, search, at.child("search")),
                attack=dataclasses.replace(bind_at(AttackSettings, attack, at.child("search")),
                                           seed=int(search.get("seed", 0))),
                select=bind_at(SelectionSettings, tables["select"], at.child("select")),
                label=bind_at(LabelConfig, label, at.child("label")),
                label_options=options,
                finetune=bind_at(FinetuneConfig, own, at.child("finetune")),
                train=train,
                evaluate=bind_at(EvaluateConfig, tables["evaluate"], at.child("evaluate")),
                source=source,
                base_dir=at.base,
            )
            config.check()
        except InputError as exc:
            raise ConfigError(str(exc), source=source) from exc
        return config

    def check(self) -> None:
        """Raise InputError / ConfigError on settings that cannot work together, before any work is done."""
        for table, settings in (("search", self.attack), ("select", self.select)):
            try:
                settings.check()
            except InputError as exc:  # their messages name the key within the table
                raise ConfigError(str(exc), source=self.source, field=table) from None
        if self.finetune.mode == "direct" and self.train.get("loss", {}).get("conservative_forces", 0) > 0:
            raise InputError("finetune.mode = 'direct' trains energy + direct forces only; remove finetune.loss.conservative_forces")
        if self.finetune.mode == "conservative" and self.train.get("loss", {}).get("conservative_forces", 1.0) <= 0:
            raise InputError("finetune.mode = 'conservative' needs finetune.loss.conservative_forces > 0")
        # the fine-tuning table is checked now, not after the first search and labelling
        self.train_config(self.run_dir / "check", [self.run_dir / "check.extxyz"], self.run_dir / "check.pt")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for the state file and resume checks (generations excluded: it may grow)."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name in ("source", "base_dir", "generations"):
                continue
            value = getattr(self, f.name)
            out[f.name] = value
        return to_jsonable(out)


@dataclass(frozen=True)
class _Top:
    """Top-level keys of an improve config."""

    run_dir: Path
    model: str = "molecular-small"
    generations: int = 1
    device: str = "cpu"
    tolerance: float = 0.05

    def __post_init__(self) -> None:
        if self.generations < 1:
            raise FieldError("generations", f"must be >= 1, got {self.generations}")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise FieldError("tolerance", f"must be >= 0, got {self.tolerance}")


def _split(table: dict[str, Any], classes: tuple[type, type], at: At, skip: set[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A table whose keys belong to two dataclasses, split into the first's keys and the second's (minus skip);
    an unknown key names the table and the closest key of either."""
    first = {f.name for f in toml_fields(classes[0])}
    second = {f.name for f in toml_fields(classes[1])} - skip - first
    for key in table:
        if key not in first | second:
            raise at.unknown(key, sorted(first | second))
    return {k: v for k, v in table.items() if k in first}, {k: v for k, v in table.items() if k in second}
