"""`atomuq bench`: how well do the UQ scores of a model rank, flag and bound its true force errors, per system?

From labelled structures (reference forces required) the model is scored once (workflows.score): per
structure the Force Delta U_Δ, the direct and conservative force errors ε_nc and ε_c, the confidence head's
predicted error when the model has one, and with ensemble members the ensemble_std and the ensemble-mean
error ε_ens (all eV/Å, RMS over the 3N components). Structures are grouped by system (an info key, default
"molecule", else the file name). Per system and pooled, with the functions of uq.evaluate:

- Spearman r_s of every (score, error) pair in PAIRS with a percentile bootstrap interval over structures;
- ROC-AUC of each score as a detector of its error above a threshold (the system's own flag_quantile of the
  error unless an absolute threshold is given; threshold and base rate reported);
- calibration of every error-unit σ in SIGMAS (raw U_Δ, the isotonic map g(U_Δ) when calibrated, the
  confidence head, ensemble_std against ε_ens): RMSE against RMV in equal-count bins, ENCE, ZMS, and the
  miscalibration area on the signed force components (bootstrap resampling whole structures);
- with a calibration set: the isotonic map U_Δ → RMS ε_nc fitted on a third of it, split-conformal bounds
  ε_nc ≤ q̂·g(U_Δ) (and ≤ q̂·U_Δ) calibrated on another third, and their empirical coverage on the last third
  (exchangeable with the calibration data) and on every input file;
- model-averaged correlations over systems: the mean of the per-system r_s, and r_s of the per-system means.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from atomuq.core.errors import InputError
from atomuq.core.io import Record, read_structures, reference_forces
from atomuq.core.validate import check_records, check_references
from atomuq.models.protocol import AtomisticModel
from atomuq.uq.ensemble import Member
from atomuq.uq.evaluate import (
    BootstrapCI,
    ConformalCalibrator,
    IsotonicMap,
    bootstrap_ci,
    ence,
    min_calibration_size,
    miscalibration_area,
    rmse_vs_rmv,
    roc_auc,
    spearman,
    zms,
)
from atomuq.workflows.score import score_records

#: (score, error) pairs whose rank correlation and ROC-AUC are reported, when both are present
PAIRS = (
    ("force_delta", "eps_c"),
    ("force_delta", "eps_nc"),
    ("confidence_error", "eps_nc"),
    ("ensemble_std", "eps_ensemble"),
    ("ensemble_std", "eps_nc"),
)
#: error-unit uncertainties tested for calibration: name -> (σ key, error key, force-component key)
SIGMAS = {
    "U_Δ (raw)": ("force_delta", "eps_nc", "direct"),
    "g(U_Δ) (isotonic)": ("calibrated_force_delta", "eps_nc", "direct"),
    "confidence head": ("confidence_error", "eps_nc", "direct"),
    "ensemble_std": ("ensemble_std", "eps_ensemble", "ensemble"),
}
#: short symbols used in tables and figures
SYMBOLS = {
    "force_delta": "U_Δ",
    "eps_c": "ε_c",
    "eps_nc": "ε_nc",
    "confidence_error": "conf",
    "ensemble_std": "σ_ens",
    "eps_ensemble": "ε_ens",
}
#: conformal normalisers g: the isotonic map of U_Δ, or U_Δ itself
NORMALISERS = ("g(U_Δ)", "U_Δ")
#: fewest labelled structures a benchmark ranks (a rank correlation of two is always ±1)
MIN_STRUCTURES = 3
#: fewest structures of a calibration set (thirds: map, conformal, held back)
MIN_CALIBRATION = 6
#: resamples of the (slower, per-resample) grouped bootstrap of the miscalibration area, at most
AREA_BOOT = 200


@dataclass
class BenchData:
    """Per-structure scores and errors (eV/Å) of scored, labelled structures, with their system and file.

    values: key -> (n,) arrays (keys of PAIRS / SIGMAS that were computed); components: "direct" (F_nc − F_ref)
    and "ensemble" (ensemble-mean − F_ref) signed force components (eV/Å), flattened, with component_structure
    the structure index of each. clusters: (n,) id of the group of correlated structures each belongs to
    (e.g. one adversarial search); the bootstrap resamples whole clusters. None: every structure on its own.
    """

    systems: np.ndarray
    files: np.ndarray
    values: dict[str, np.ndarray]
    components: dict[str, np.ndarray] = field(default_factory=dict)
    component_structure: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=int))
    clusters: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.systems)

    def subset(self, mask: np.ndarray) -> BenchData:
        """The structures where mask is True (components included, structure ids renumbered)."""
        index = np.flatnonzero(mask)
        renumber = np.full(len(self), -1)
        renumber[index] = np.arange(len(index))
        keep = mask[self.component_structure]
        return BenchData(
            systems=self.systems[index],
            files=self.files[index],
            values={k: v[index] for k, v in self.values.items()},
            components={k: v[keep] for k, v in self.components.items()},
            component_structure=renumber[self.component_structure[keep]],
            clusters=None if self.clusters is None else self.clusters[index],
        )

    def with_values(self, **extra: np.ndarray) -> BenchData:
        """A copy with extra per-structure arrays."""
        return BenchData(self.systems, self.files, {**self.values, **extra}, self.components, self.component_structure,
                         self.clusters)


def system_name(record: Record, group_key: str) -> str:
    """The system a structure belongs to: info[group_key], else its file name."""
    value = record.atoms.info.get(group_key)
    return str(value) if value is not None else Path(record.source).name


def check_labelled(records: Sequence[Record], forces_key: str | None = None) -> None:
    """InputError naming the first structure without reference forces (and how many lack them)."""
    missing = [r for r in records if (f := reference_forces(r.atoms, forces_key)) is None or f.shape != (len(r.atoms), 3)]
    if missing:
        where = missing[0].where
        raise InputError(
            f"{where}: no reference forces ({len(missing)} of {len(records)} structures lack them); bench needs "
            "labelled structures: label them first (atomuq label INPUT -o OUT --method gfn2-xtb) or name the "
            "forces array with --forces-key"
        )


def collect(
    records: Sequence[Record],
    model: AtomisticModel,
    ensemble: Sequence[Member] | None = None,
    ensemble_names: Sequence[str] | None = None,
    group_key: str = "molecule",
    batch_size: int = 16,
    forces_key: str | None = None,
    progress: Callable[[int], None] | None = None,
    cluster_key: str | None = None,
) -> BenchData:
    """Score labelled structures (workflows.score) into per-structure scores and errors (eV/Å).

    cluster_key: info key whose value (with the file and system) names a group of correlated structures,
    e.g. "source_index" for the frames of one adversarial search; the bootstrap then resamples groups.
    """
    check_labelled(records, forces_key)
    scored, _ = score_records(
        records, model, batch_size, forces_key=forces_key, progress=progress, ensemble=ensemble, ensemble_names=ensemble_names
    )
    keys = ["force_delta", "eps_nc", "eps_c"]
    keys += [k for k in ("confidence_error", "ensemble_std", "eps_ensemble") if all(k in a.info for a in scored)]
    values = {k: np.array([a.info[k] for a in scored], dtype=float) for k in keys}
    components = {"direct": [(a.arrays["forces_direct"] - a.arrays["REF_forces"]).ravel() for a in scored]}
    if ensemble:
        components["ensemble"] = [(a.arrays["forces_ensemble_mean"] - a.arrays["REF_forces"]).ravel() for a in scored]
    return BenchData(
        systems=np.array([system_name(r, group_key) for r in records]),
        files=np.array([r.source for r in records]),
        values=values,
        components={k: np.concatenate(v) for k, v in components.items()},
        component_structure=np.repeat(np.arange(len(scored)), [3 * len(a) for a in scored]),
        clusters=None if cluster_key is None else cluster_ids(records, group_key, cluster_key),
    )


def cluster_ids(records: Sequence[Record], group_key: str, cluster_key: str) -> np.ndarray:
    """(n,) integer id of (file, system, info[cluster_key]) per structure; InputError naming one that lacks the key."""
    labels = []
    for r in records:
        if cluster_key not in r.atoms.info:
            raise InputError(f"{r.where}: no info key {cluster_key!r} to group correlated structures by "
                             "(--cluster-key); drop the option or add the key")
        labels.append((r.source, system_name(r, group_key), str(r.atoms.info[cluster_key])))
    _, ids = np.unique(np.array(labels), axis=0, return_inverse=True)
    return ids.ravel()


@dataclass
class Calibration:
    """The isotonic map g: U_Δ → RMS ε_nc and conformal calibrators (per normaliser) fitted on one labelled file,
    with (U_Δ, ε_nc) of the third of that file that fitted neither (an exchangeable test set)."""

    source: str
    map: IsotonicMap
    conformal: dict[str, ConformalCalibrator]
    n_map: int
    n_conformal: int
    held_back: tuple[np.ndarray, np.ndarray]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the map's knots; the calibrators' residuals are saved separately)."""
        return {"source": self.source, "n_map": self.n_map, "n_conformal": self.n_conformal, "n_held_back": len(self.held_back[0])}


def check_calibration_size(n: int, levels: Sequence[float], source: str) -> None:
    """InputError unless a calibration file of n structures gives finite conformal bounds at every level: its
    conformal third (n // 3 structures) needs uq.evaluate.min_calibration_size(level) of them."""
    level = max(levels)
    needed = max(MIN_CALIBRATION, 3 * min_calibration_size(level))
    if n < needed:
        raise InputError(f"{source}: {n} labelled structures; a third of them calibrates the conformal bounds, and "
                         f"coverage {level:g} needs {min_calibration_size(level)} there: give at least {needed} "
                         "structures, or lower --levels")


def fit_calibration(data: BenchData, source: str, seed: int = 0) -> Calibration:
    """Split data at random in thirds: one fits g (isotonic, RMS ε_nc), one calibrates the conformal bounds, one is held
    back to test their coverage on structures exchangeable with the calibration ones."""
    if len(data) < MIN_CALIBRATION:
        raise InputError(f"{source}: the calibration set needs at least {MIN_CALIBRATION} structures, got {len(data)}")
    order = np.random.default_rng(seed).permutation(len(data))
    third = len(data) // 3
    fit_map, fit_conformal, held_back = order[:third], order[third : 2 * third], order[2 * third :]
    u, eps = data.values["force_delta"], data.values["eps_nc"]
    g = IsotonicMap("rms").fit(u[fit_map], eps[fit_map])
    conformal = {
        name: ConformalCalibrator(g if name == NORMALISERS[0] else "score").fit(u[fit_conformal], eps[fit_conformal])
        for name in NORMALISERS
    }
    return Calibration(source, g, conformal, len(fit_map), len(fit_conformal), (u[held_back], eps[held_back]))


def _ci(statistic: Callable[..., Any], *arrays: np.ndarray, **kwargs: Any) -> dict[str, Any]:
    """bootstrap_ci(...).to_dict(), or {"undefined": reason} where the statistic is undefined on these data."""
    try:
        result: BootstrapCI = bootstrap_ci(statistic, *arrays, **kwargs)
    except InputError as exc:
        return {"undefined": str(exc)}
    return result.to_dict()


def _flag(score: np.ndarray, error: np.ndarray, quantile: float, threshold: float | None, n_boot: int, seed: int,
          groups: np.ndarray | None = None) -> dict[str, Any]:
    """ROC-AUC of score flagging error > threshold (default: the error's own quantile), with threshold and base rate."""
    cut = float(np.quantile(error, quantile)) if threshold is None else float(threshold)
    out = {"threshold": cut, "base_rate": float(np.mean(error > cut))}
    out["auc"] = _ci(roc_auc, score, error, threshold=cut, n_boot=n_boot, seed=seed, groups=groups)
    return out


def _calibration(
    data: BenchData, sigma_key: str, error_key: str, component_key: str, n_bins: int, n_boot: int, seed: int
) -> dict[str, Any]:
    """ENCE, ZMS, miscalibration area (force components, whole structures resampled) and RMSE vs RMV bins."""
    sigma, error = data.values[sigma_key], data.values[error_key]
    bins = max(1, min(n_bins, len(sigma) // 5))
    out: dict[str, Any] = {"n_bins": bins}
    try:
        out["rmse_vs_rmv"] = rmse_vs_rmv(sigma, error, bins).to_dict()
    except InputError as exc:
        return {"undefined": str(exc)}
    out["ence"] = _ci(ence, sigma, error, n_bins=bins, n_boot=n_boot, seed=seed, groups=data.clusters)
    out["zms"] = _ci(zms, sigma, error, n_boot=n_boot, seed=seed, groups=data.clusters)
    if component_key in data.components:
        structure = data.component_structure
        out["miscalibration_area"] = _ci(
            miscalibration_area,
            sigma[structure],
            data.components[component_key],
            groups=structure,
            n_boot=min(n_boot, AREA_BOOT),
            seed=seed,
        )
    return out


def evaluate_group(
    data: BenchData,
    n_boot: int = 1000,
    flag_quantile: float = 0.9,
    flag_threshold: float | None = None,
    n_bins: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Every headline number of one group of structures (see the module doc); JSON-ready."""
    v = data.values
    out: dict[str, Any] = {
        "n": len(data),
        "files": sorted(set(data.files.tolist())),
        "mean": {k: float(x.mean()) for k, x in v.items()},
        "spearman": {},
        "roc_auc": {},
        "calibration": {},
    }
    for score, error in PAIRS:
        if score in v and error in v:
            key = f"{score}_vs_{error}"
            out["spearman"][key] = _ci(spearman, v[score], v[error], n_boot=n_boot, seed=seed, groups=data.clusters)
            out["roc_auc"][key] = _flag(v[score], v[error], flag_quantile, flag_threshold, n_boot, seed, data.clusters)
    for name, (sigma_key, error_key, component_key) in SIGMAS.items():
        if sigma_key in v and error_key in v:
            out["calibration"][name] = _calibration(data, sigma_key, error_key, component_key, n_bins, n_boot, seed)
    return out


def model_averaged(systems: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Across systems: the mean of per-system r_s (with their spread), and r_s of the per-system mean score and error."""
    out: dict[str, Any] = {"n_systems": len(systems), "mean_of_system_spearman": {}, "spearman_of_system_means": {}}
    for score, error in PAIRS:
        key = f"{score}_vs_{error}"
        values = [s["spearman"][key]["estimate"] for s in systems.values() if "estimate" in s["spearman"].get(key, {})]
        if values:
            out["mean_of_system_spearman"][key] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
        if len(systems) >= 3 and all(score in s["mean"] and error in s["mean"] for s in systems.values()):
            means = np.array([[s["mean"][score], s["mean"][error]] for s in systems.values()])
            try:
                out["spearman_of_system_means"][key] = spearman(means[:, 0], means[:, 1])
            except InputError as exc:
                out["spearman_of_system_means"][key] = {"undefined": str(exc)}
    return out


def _coverage(u: np.ndarray, eps: np.ndarray, in_sample: bool, calibration: Calibration, levels: Sequence[float]) -> dict[str, Any]:
    """Coverage of every normaliser's bounds at every level on (U_Δ, ε_nc) of one set."""
    return {
        "n": len(u),
        "in_sample": in_sample,
        "mean_eps_nc": float(eps.mean()),
        "coverage": {norm: [c.coverage(u, eps, level).to_dict() for level in levels] for norm, c in calibration.conformal.items()},
    }


def coverage_by_file(data: BenchData, calibration: Calibration, levels: Sequence[float]) -> dict[str, Any]:
    """Empirical coverage of the conformal bounds per input file and normaliser, first on the held-back third of the
    calibration file; input files equal to the calibration file are marked in_sample (they calibrated the bounds)."""
    held = f"{calibration.source} [held-back third]"
    out: dict[str, Any] = {held: _coverage(*calibration.held_back, False, calibration, levels)}
    u, eps = data.values["force_delta"], data.values["eps_nc"]
    for name in sorted(set(data.files.tolist())):
        mask = data.files == name
        in_sample = Path(name).resolve() == Path(calibration.source).resolve()
        out[name] = _coverage(u[mask], eps[mask], in_sample, calibration, levels)
    return out


@dataclass
class BenchSettings:
    """What to compute: bootstrap resamples, coverage levels, ROC flag threshold, bins, seed."""

    n_boot: int = 1000
    levels: tuple[float, ...] = (0.8, 0.9, 0.95)
    flag_quantile: float = 0.9
    flag_threshold: float | None = None
    n_bins: int = 10
    seed: int = 0

    def check(self) -> None:
        """Raise InputError for settings that cannot work."""
        if self.n_boot < 10:
            raise InputError(f"--bootstrap must be at least 10, got {self.n_boot}")
        if not self.levels or any(not 0 < lv < 1 for lv in self.levels):
            raise InputError(f"--levels must lie strictly between 0 and 1, got {list(self.levels)}")
        if not 0 < self.flag_quantile < 1:
            raise InputError(f"--flag-quantile must lie strictly between 0 and 1, got {self.flag_quantile}")
        if self.n_bins < 1:
            raise InputError(f"--bins must be at least 1, got {self.n_bins}")


def evaluate_bench(data: BenchData, settings: BenchSettings, calibration: Calibration | None = None) -> dict[str, Any]:
    """The bench report (JSON-ready): per system, pooled, model-averaged, and coverage when calibrated."""
    settings.check()
    if calibration is not None:
        data = data.with_values(calibrated_force_delta=calibration.map.predict(data.values["force_delta"]))
    kwargs = dict(
        n_boot=settings.n_boot,
        flag_quantile=settings.flag_quantile,
        flag_threshold=settings.flag_threshold,
        n_bins=settings.n_bins,
        seed=settings.seed,
    )
    systems = {name: evaluate_group(data.subset(data.systems == name), **kwargs) for name in dict.fromkeys(data.systems.tolist())}
    report: dict[str, Any] = {
        "settings": {**settings.__dict__, "levels": list(settings.levels)},
        "n_structures": len(data),
        "systems": systems,
        "all": evaluate_group(data, **kwargs),
        "model_averaged": model_averaged(systems),
    }
    if calibration is not None:
        report["calibration"] = {
            **calibration.to_dict(),
            "coverage": coverage_by_file(data, calibration, settings.levels),
        }
    return report


def load_labelled(paths: Sequence[str | Path], model: AtomisticModel, forces_key: str | None = None,
                  minimum: int = MIN_STRUCTURES) -> list[Record]:
    """Read and validate structures (core.validate: elements, overlaps, finite labels), check that every one carries
    reference forces and that there are at least `minimum` of them."""
    records = read_structures(paths)
    check_records(records, model.elements)
    check_references(records, forces_key)
    check_labelled(records, forces_key)
    if len(records) < minimum:
        files = ", ".join(map(str, paths))
        raise InputError(f"{files}: {len(records)} labelled structure(s); a benchmark ranks errors and needs at least "
                         f"{minimum}: give more structures")
    return records


def bench_files(
    inputs: Sequence[str | Path],
    model: AtomisticModel,
    *,
    settings: BenchSettings | None = None,
    ensemble: Sequence[Member] | None = None,
    ensemble_names: Sequence[str] | None = None,
    group_key: str = "molecule",
    cluster_key: str | None = None,
    calibrate_on: str | Path | None = None,
    batch_size: int = 16,
    forces_key: str | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> tuple[BenchData, dict[str, Any], Calibration | None]:
    """Read, check, score and evaluate labelled structure files (the whole of `atomuq bench` but writing).

    Every file is read and checked (elements, overlaps, reference forces) before any scoring. progress(n) is
    called per n structures scored (calibration file first), on_total once with their number.
    meta (command, model name, ...) goes into the report.
    """
    settings = settings or BenchSettings()
    settings.check()
    records = load_labelled(inputs, model, forces_key)
    cal_records = load_labelled([calibrate_on], model, forces_key, minimum=MIN_CALIBRATION) if calibrate_on is not None else []
    if calibrate_on is not None:
        check_calibration_size(len(cal_records), settings.levels, str(calibrate_on))
    if on_total is not None:
        on_total(len(records) + len(cal_records))
    score = dict(
        ensemble=ensemble,
        ensemble_names=ensemble_names,
        group_key=group_key,
        batch_size=batch_size,
        forces_key=forces_key,
        progress=progress,
    )
    calibration = None
    if calibrate_on is not None:
        cal_data = collect(cal_records, model, **{**score, "ensemble": None, "ensemble_names": None})
        calibration = fit_calibration(cal_data, str(calibrate_on), settings.seed)
    data = collect(records, model, **score, cluster_key=cluster_key)
    report = {**(meta or {}), "group_key": group_key, "cluster_key": cluster_key, "inputs": [str(p) for p in inputs],
              **evaluate_bench(data, settings, calibration)}
    return data, report, calibration
