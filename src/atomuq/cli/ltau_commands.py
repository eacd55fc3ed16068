"""`atomuq ltau fit | score | calibrate | weights | compact`: LTAU-FF from training error logs and latent nearest neighbours."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import numpy as np
import typer
from rich.table import Table

from atomuq.cli.ensemble_options import load_model_option
from atomuq.cli.common import (
    HELP_MARKUP,
    cell,
    check_device,
    console,
    fail,
    model_help,
    note,
    note_earlier_results,
    output_file,
    output_folder,
    progress_bar,
    say,
    user_errors,
)
from atomuq.core.errors import InputError
from atomuq.core.io import Record, atomic_path, read_structures, write_structures
from atomuq.core.paths import check_distinct_outputs
from atomuq.core.schema import LTAU
from atomuq.core.validate import check_records, check_references
from atomuq.models.registry import DEFAULT_MODEL
from atomuq.uq.ltau.estimator import LTAUEstimator
from atomuq.uq.ltau.index import DEFAULT_PARAMETERS, KINDS
from atomuq.uq.ltau.plots import reliability_figure
from atomuq.uq.ltau.reweight import SCHEMES, loss_weights
from atomuq.workflows.error_log import EDGES_PER_DECADE, HISTOGRAM_RANGE, compact_error_log
from atomuq.workflows.ltau import ScoredAtoms, annotate, calibrate, fit_from_logs, predict_records

ltau_app = typer.Typer(no_args_is_help=True, add_completion=False, rich_markup_mode=HELP_MARKUP,
                       help="LTAU-FF: uncertainty from training-error trajectories and latent nearest neighbours.")


# options shared by score and calibrate
_MODEL = typer.Option(None, "--model", "-m", help=model_help("Model", None) + " Default: the one the estimator was fitted with.")
_K = typer.Option(1, "-k", "--neighbours", min=1, help="Training neighbours averaged per atom.")
_BATCH = typer.Option(16, "--batch-size", min=1, help="Structures per batch.")
_FORCES_KEY = typer.Option(None, "--forces-key", help="Array holding reference forces (default: REF_forces or calculator results).")
_DEVICE = typer.Option("cpu", "--device", help="cpu or cuda.")


def _parameters(items: List[str]) -> dict[str, int]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--index-param {item!r}: expected KEY=VALUE, e.g. ef_search=64")
        try:
            out[key.strip()] = int(value)
        except ValueError:
            fail(f"--index-param {item!r}: the value must be an integer")
    return out


def _predict(inputs: List[Path], estimator: LTAUEstimator, model: Optional[str], device: str, k: int,
             atol: Optional[float], batch_size: int, forces_key: Optional[str]) -> tuple[list[Record], ScoredAtoms]:
    """Read and check the structures, then LTAU per atom with a progress bar (model default: the fitted one)."""
    records = read_structures(inputs)
    net = load_model_option(model or estimator.metadata.get("model_name") or DEFAULT_MODEL, device)
    check_records(records, net.elements)
    check_references(records, forces_key)
    with progress_bar() as bar:
        task = bar.add_task("LTAU", total=len(records))
        scored = predict_records(records, net, estimator, k, atol, batch_size, forces_key,
                                 progress=lambda n: bar.advance(task, n))
    return records, scored


@ltau_app.command("fit")
def fit(
    logs: List[Path] = typer.Option(..., "--logs", help="Error-log folder(s) <run_dir>/error_log; several runs give μ_M and σ_M."),
    train: List[Path] = typer.Option(..., "--train", help="The training file(s) of those runs (matched by SHA-256)."),
    output: Path = typer.Option(..., "-o", "--output", help="Estimator file to write (.npz)."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m", help=model_help("Model giving the descriptors; it must be the model of one of the --logs runs")
    ),
    errors: str = typer.Option("direct", "--errors", help="Which logged errors: direct or conservative forces."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Tolerance in eV/Å (default: mean final-epoch error norm)."),
    rtol: float = typer.Option(0.0, "--rtol", min=0.0, help="Relative tolerance: threshold atol + rtol·|F_ref|."),
    skip_epochs: Optional[int] = typer.Option(
        None, "--skip-epochs", min=0, help="Ignore the first N training epochs of every run (default: every epoch the log holds)."
    ),
    index: str = typer.Option("flat", "--index", help=f"FAISS index: {', '.join(KINDS)} (flat is exact; ivfsq and ivfpq "
                              "are compressed and memory-mapped, for 10^6 training atoms and more)."),
    index_param: List[str] = typer.Option([], "--index-param", help="KEY=VALUE: " + "; ".join(
        f"{', '.join(keys)} ({kind})" for kind, keys in DEFAULT_PARAMETERS.items() if keys)),
    descriptors: Optional[Path] = typer.Option(None, "--descriptors", help="Write the training descriptors to this .npy "
                                               "file (memory-mapped, batch by batch) instead of holding them in memory."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Structures per batch for descriptors."),
    device: str = typer.Option("cpu", "--device", help="cpu or cuda."),
) -> None:
    """Fit an LTAU estimator: per-atom confidences p_i from error logs, descriptors of the training atoms, a FAISS index."""
    device = check_device(device)
    if errors not in ("direct", "conservative"):
        fail(f"--errors {errors!r}: use direct or conservative")
    with user_errors():
        output_file(output)
        if descriptors is not None:
            output_file(descriptors, "--descriptors")
            check_distinct_outputs({"--output": output, "--descriptors": descriptors})
        net = load_model_option(model, device)
        start = time.perf_counter()
        with progress_bar() as bar:
            task = bar.add_task("descriptors", total=None)
            estimator = fit_from_logs(logs, net, train, kind=errors, atol=atol, rtol=rtol, skip_epochs=skip_epochs,
                                      index_kind=index, index_parameters=_parameters(index_param),
                                      batch_size=batch_size, progress=lambda n: bar.advance(task, n),
                                      on_total=lambda n: bar.update(task, total=n), descriptor_file=descriptors)
        estimator.metadata["model_name"] = model or DEFAULT_MODEL
        estimator.save(output)
    if estimator.metadata["confidence_read_out"] != "exact":
        note(f"p_i {estimator.metadata['confidence_read_out']}")
    p = estimator.confidence
    table = Table(title=cell(f"LTAU estimator {output}"))
    table.add_column("quantity")
    table.add_column("value", justify="right")
    rows = [
        ("runs (epochs each)", f"{len(logs)} ({', '.join(map(str, estimator.metadata['epochs_per_run']))})"),
        ("training atoms", f"{estimator.n_atoms:,}"),
        ("descriptor width", str(estimator.index.dimension)),
        ("errors", errors),
        ("atol (eV/Å)", f"{estimator.atol:.4g}" + (f" + {rtol:g}·|F_ref|" if rtol else "")),
        ("mean μ_M(p_i)", f"{p.mean():.3f}"),
        ("atoms with p_i = 0 / = 1", f"{(p == 0).mean():.1%} / {(p == 1).mean():.1%}"),
        ("mean σ_M(p_i)", f"{estimator.spread.mean():.3f}"),
        ("index", f"{index} {estimator.index.parameters or ''}".strip()),
        ("recall@k vs exact", "exact" if estimator.index.recall is None else
         f"{estimator.index.recall:.3f} (k={estimator.index.recall_k}, {estimator.index.recall_queries} queries)"),
        ("time (s)", f"{time.perf_counter() - start:.1f}"),
    ]
    for name, value in rows:
        table.add_row(name, cell(value))
    console.print(table)


@ltau_app.command("score")
def score(
    inputs: List[Path] = typer.Argument(..., help="Structure files ASE can read."),
    output: Path = typer.Option(..., "-o", "--output", help="Output extended XYZ file."),
    estimator_path: Path = typer.Option(..., "--estimator", "-e", help="Estimator file from `atomuq ltau fit`."),
    model: Optional[str] = _MODEL,
    k: int = _K,
    atol: Optional[float] = typer.Option(None, "--atol", help="Read p_j at another tolerance (eV/Å) from the stored histograms."),
    batch_size: int = _BATCH,
    forces_key: Optional[str] = _FORCES_KEY,
    device: str = _DEVICE,
    top: int = typer.Option(10, "--top", min=1, help="Rows in the summary table."),
) -> None:
    """Per-atom ltau_confidence, ltau_uncertainty, ltau_expected_error (eV/Å), ltau_distance; per-structure aggregates."""
    device = check_device(device)
    with user_errors():
        output_file(output)
        estimator = LTAUEstimator.load(estimator_path)
        records, scored = _predict(inputs, estimator, model, device, k, atol, batch_size, forces_key)
        atoms, rows = annotate(records, scored, estimator.metadata.get("force_kind", "direct"))
        write_structures(output, atoms)
    table = Table(title=f"LTAU, least trusted first ({min(top, len(rows))} of {len(rows)}); p_j refers to error ≤ "
                        f"{scored.prediction.threshold:.4g} eV/Å, k = {k}")
    text = ("file:index", "structure", "formula")
    for name in ("rank", *text, "atoms", "mean 1-p_j", "max 1-p_j", "expected error eV/Å", "max distance", "error eV/Å"):
        table.add_column(name, justify="left" if name in text else "right")
    for rank, r in enumerate(sorted(rows, key=lambda r: r.uncertainty, reverse=True)[:top], 1):
        table.add_row(str(rank), cell(f"{Path(r.source).name}:{r.index}"), cell(r.tag), r.formula, str(r.n_atoms),
                      f"{r.uncertainty:.3f}", f"{r.uncertainty_max:.3f}", f"{r.expected_error:.4f}",
                      f"{r.distance_max:.3g}", "-" if r.error is None else f"{r.error:.4f}")
    console.print(table)
    note_earlier_results([r.atoms for r in records], LTAU, scored.provenance)
    say(f"wrote {len(atoms)} structures to {output}")


@ltau_app.command("calibrate")
def calibrate_command(
    inputs: List[Path] = typer.Argument(..., help="Held-out structures with reference forces."),
    estimator_path: Path = typer.Option(..., "--estimator", "-e", help="Estimator file to calibrate."),
    output: Path = typer.Option(..., "-o", "--output", help="Calibrated estimator file to write."),
    model: Optional[str] = _MODEL,
    k: int = _K,
    bins: int = typer.Option(10, "--bins", min=2, help="Equal-width bins of p_j for the reliability curve."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write the reliability curves before and after (PNG)."),
    batch_size: int = _BATCH,
    forces_key: Optional[str] = _FORCES_KEY,
    device: str = _DEVICE,
) -> None:
    """Fit the scale s (p_j then refers to error ≤ s·atol) on held-out atoms; report miscalibration area and Brier score."""
    device = check_device(device)
    with user_errors():
        check_distinct_outputs({"--output": output, **({"--plot": plot} if plot is not None else {})})
        output_file(output)
        if plot is not None:
            output_file(plot, "--plot")
        estimator = LTAUEstimator.load(estimator_path)
        if estimator.calibrated:
            raise InputError(f"{estimator_path}: already calibrated (s = {estimator.scale:.4g}); calibrate the "
                             "uncalibrated estimator from `atomuq ltau fit` instead")
        _, scored = _predict(inputs, estimator, model, device, k, None, batch_size, forces_key)
        result = calibrate(scored, estimator, bins, where=", ".join(map(str, inputs)))
        record = {**result.fit.as_dict(), "k": k, "bins": bins, "files": [str(p) for p in inputs]}
        estimator.with_scale(result.fit.scale, record).save(output)
        if plot is not None:
            reliability_figure([(f"k = {k}", [("s = 1", result.before), (f"s = {result.fit.scale:.2f}", result.after)])],
                               plot)
    f = result.fit
    table = Table(title=f"LTAU calibration on {f.n_atoms:,} atoms (k = {k}, atol {estimator.atol:.4g} eV/Å)")
    for name in ("", "scale s", "miscalibration area", "Brier score"):
        table.add_column(name, justify="right")
    table.add_row("before", "1", f"{f.area_before:.4f}", f"{f.brier_before:.4f}")
    table.add_row("after", f"{f.scale:.3f}", f"{f.area_after:.4f}", f"{f.brier_after:.4f}")
    console.print(table)
    say(f"wrote {output}" + (f" and {plot}" if plot else ""))


@ltau_app.command("weights")
def weights(
    estimator_path: Path = typer.Option(..., "--estimator", "-e", help="Estimator file (holds μ_M and σ_M of the training atoms)."),
    scheme: str = typer.Option(..., "--scheme", help=f"{' or '.join(SCHEMES)}: up-weight easy or hard atoms."),
    lam: float = typer.Option(..., "--lambda", help="Strength λ of the exponential weights (paper: 2.0 easy, 4.5 hard)."),
    output: Path = typer.Option(..., "-o", "--output", help="Per-atom loss weights (.npy), training-atom order, mean 1."),
) -> None:
    """Per-atom training loss weights from μ_M(p_i) and σ_M(p_i) (LTAU-FF appendix E) for `data.atom_weights`
    of a training configuration."""
    with user_errors():
        output_file(output)
        estimator = LTAUEstimator.load(estimator_path)
        w = loss_weights(estimator.confidence, estimator.spread, scheme, lam)
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as tmp, open(tmp, "wb") as handle:
            np.save(handle, w.astype(np.float32))
    say(f"{len(w):,} weights ({scheme}, λ = {lam:g}): min {w.min():.3f}, median {np.median(w):.3f}, "
        f"max {w.max():.3f}; wrote {output} (set data.atom_weights in the training configuration)")


@ltau_app.command("compact")
def compact_log(
    log: Path = typer.Argument(..., help="A full error-log folder <run_dir>/error_log."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder to write the compact log to (error_log.json, error_histograms.npz)."),
    skip_epochs: int = typer.Option(0, "--skip-epochs", min=0, help="Keep only the epochs after the first N (ltau fit then reads those)."),
    per_decade: int = typer.Option(
        EDGES_PER_DECADE, "--bins-per-decade", min=1, max=100,
        help=f"Log-spaced histogram edges per decade from {HISTOGRAM_RANGE[0]:g} to {HISTOGRAM_RANGE[1]:g} eV/Å.",
    ),
) -> None:
    """Per-atom histograms of a full error log (a few MB to commit instead of hundreds): `ltau fit --logs` reads
    either form; p_i is exact at every bin edge and at the mean final-epoch error, log-linear in between."""
    with user_errors():
        output_folder(output)
        compact = compact_error_log(log, output, skip_epochs=skip_epochs, per_decade=per_decade)
    full = sum(p.stat().st_size for p in Path(log).iterdir() if p.is_file())
    small = sum(p.stat().st_size for p in output.iterdir() if p.is_file())
    first, last = compact.epochs
    finals = compact.metadata["final_epoch_mean_error"]
    say(f"{compact.n_atoms:,} atoms, epochs {first}-{last}, {per_decade} edges per decade; mean final-epoch error "
        f"{finals['direct']:.4g} (direct), {finals['conservative']:.4g} (conservative) eV/Å; "
        f"{full / 1e3:,.0f} kB -> {small / 1e3:,.0f} kB; wrote {output}")
