"""Cost of one Force Delta evaluation against a 5-member ensemble on the same structures (paper: ensembles 5–10×).

On one batch set of real structures (default: the first --structures frames of each molecule in
data/molecular/test_300K, batches of --batch-size), one thread, times per pass over all batches:

- direct: the bundled model's direct forces only (no autograd graph), the cost of using F_nc alone;
- force delta: direct + conservative forces (one backward pass) and U_Δ (uq.force_delta), what `atomuq score` does;
- ensemble (direct): the 5 bundled members (molecular-small, -seed1..4) with direct forces + ensemble_std;
- ensemble (conservative): the same members with conservative forces (each needs its backward pass).

The four modes are timed interleaved, `--repeats` times each; the table gives the median and the minimum, and
the ratios use the medians. The neighbour list is included in every mode (each evaluation builds its own).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ensemble_cost.py
Writes benchmarks/results/ensemble_cost.json and .md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from atomuq.core.batch import Batch
from atomuq.core.io import read_structures
from atomuq.models.derivatives import evaluate
from atomuq.models.registry import resolve_model
from atomuq.uq.ensemble import ensemble_uncertainty, evaluate_ensemble
from atomuq.uq.force_delta import force_delta

RESULTS = Path(__file__).resolve().parent / "results"
MEMBERS = ("molecular-small", "molecular-small-seed1", "molecular-small-seed2", "molecular-small-seed3", "molecular-small-seed4")


def batches(path: Path, per_molecule: int, batch_size: int, dtype: torch.dtype) -> list[Batch]:
    """The first per_molecule frames of every molecule in path, in batches of batch_size."""
    seen: dict[str, int] = {}
    structures = []
    for rec in read_structures([path]):
        name = rec.atoms.info.get("molecule", "")
        if seen.get(name, 0) < per_molecule:
            seen[name] = seen.get(name, 0) + 1
            structures.append(rec.atoms)
    return [Batch.from_atoms(structures[i : i + batch_size], dtype=dtype) for i in range(0, len(structures), batch_size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/molecular/test_300K.extxyz.gz")
    ap.add_argument("--structures", type=int, default=8, help="frames per molecule")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = resolve_model(None)
    members = [resolve_model(name) for name in MEMBERS]
    data = batches(Path(args.data), args.structures, args.batch_size, model.dtype)

    def direct() -> None:
        with torch.no_grad():
            for b in data:
                evaluate(model, b, conservative=False)

    def delta() -> None:
        for b in data:
            force_delta(evaluate(model, b, conservative=True).detach(), b)

    def ensemble(forces: str) -> Callable[[], None]:
        def run() -> None:
            for b in data:
                ensemble_uncertainty(evaluate_ensemble(members, b, forces), b)

        return run

    modes = {
        "direct": direct,
        "force delta": delta,
        "ensemble (direct)": ensemble("direct"),
        "ensemble (conservative)": ensemble("conservative"),
    }
    for run in modes.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for _ in range(args.repeats):
        for name, run in modes.items():
            t = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t)
    median = {k: float(np.median(v)) for k, v in times.items()}
    n_structures = sum(b.num_structures for b in data)
    n_atoms = sum(b.num_atoms for b in data)
    result = {
        "command": "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_ensemble_cost.py",
        "data": args.data,
        "structures": n_structures,
        "atoms": n_atoms,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "members": list(MEMBERS),
        "seconds_median": median,
        "seconds_min": {k: float(np.min(v)) for k, v in times.items()},
        "ratios": {
            "ensemble_direct_over_force_delta": median["ensemble (direct)"] / median["force delta"],
            "ensemble_conservative_over_force_delta": median["ensemble (conservative)"] / median["force delta"],
            "force_delta_over_direct": median["force delta"] / median["direct"],
            "ensemble_direct_over_direct": median["ensemble (direct)"] / median["direct"],
        },
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ensemble_cost.json").write_text(json.dumps(result, indent=1) + "\n")
    r = result["ratios"]
    lines = [
        "# Force Delta against a 5-member ensemble: cost on the same structures",
        "",
        f"`{result['command']}` — {n_structures} structures ({n_atoms} atoms; the first {args.structures} frames of each "
        f"molecule in {args.data}), batches of {args.batch_size}, one thread, {args.repeats} interleaved repeats "
        f"({result['processor']}, shared machine).",
        "",
        "| mode | median s | min s | ms per structure | × direct |",
        "|---|---:|---:|---:|---:|",
    ]
    for name in modes:
        lines.append(
            f"| {name} | {median[name]:.3f} | {result['seconds_min'][name]:.3f} | "
            f"{1000 * median[name] / n_structures:.2f} | {median[name] / median['direct']:.2f} |"
        )
    lines += [
        "",
        f"- ensemble of 5 (direct forces) / one U_Δ evaluation: **{r['ensemble_direct_over_force_delta']:.2f}×**",
        f"- ensemble of 5 (conservative forces) / one U_Δ evaluation: {r['ensemble_conservative_over_force_delta']:.2f}×",
        f"- U_Δ / direct-only: {r['force_delta_over_direct']:.2f}× (paper: about 2×); ensemble (direct) / direct-only: "
        f"{r['ensemble_direct_over_direct']:.2f}× (paper: ensembles 5–10×)",
        "",
    ]
    (RESULTS / "ensemble_cost.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
