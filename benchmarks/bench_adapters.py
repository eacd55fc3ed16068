"""Cost of the Force Delta over a direct-only evaluation, for Orb-v3 through the adapter and the bundled model.

Models (randomly initialised orb weights: timing only): the small Orb-v3 direct configuration of
the tests (latent 32, 2 message-passing steps), the full-size Orb-v3 direct architecture
(orb-v3-direct-20-*: latent 256, 5 steps, 20 neighbours, 25.6 M parameters), and the bundled
native model molecular-small. Structures: periodic water boxes at 1 g/cm³ of about 100 and
1,000 atoms. Direct-only: one forward pass under torch.inference_mode (no autograd graph).
Force Delta: forward + backward for the conservative forces, then u_i and U_Delta. The neighbour
list is part of both. Modes are timed interleaved in one process; seconds are minima over repeats of the
thread's CPU time (time.thread_time: time spent waiting for a core on a shared machine is left out; wall time
is in the JSON).

Run: OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_adapters.py [--sizes 100 1000] [--repeats 3]
Writes benchmarks/results/adapters.json and .md.

--family fairchem (in a venv with fairchem-core 2.x, pip install 'atomuq[fairchem]') times the fairchem
adapter instead: eSEN and UMA direct-force architectures with random weights, the small configuration
of the tests and the full size of eSEN-sm / UMA-S (sphere channels 128, 4 layers, lmax 2, 6 Å, up to
300 neighbours); writes benchmarks/results/adapters_fairchem.json and .md.

--family matched times orb-models' GNS (Orb-v3 direct, random weights) built at the width, depth, cutoff and
neighbours of the bundled molecular-small (MATCHED_ORB) against molecular-small itself, at 100, 1,000 and 10,000
atoms; writes benchmarks/results/adapters_matched.json and .md. Orb's direct and Force Delta go through plain
autograd (the adapter), the bundled model through its chunked forward and exact backward.
"""

from __future__ import annotations

import argparse
import json
import platform
from collections.abc import Callable
from pathlib import Path

import torch
from bench_force_delta import water_box
from timing import interleaved_minima

from atomuq.core.batch import Batch
from atomuq.core.memory import reuse_freed_memory
from atomuq.models.derivatives import evaluate
from atomuq.models.protocol import AtomisticModel
from atomuq.models.registry import resolve_model
from atomuq.uq.force_delta import force_delta

RESULTS = Path(__file__).resolve().parent / "results"
SMALL_ORB = {
    "latent_dim": 32,
    "base_mlp_hidden_dim": 64,
    "head_mlp_hidden_dim": 32,
    "num_message_passing_steps": 2,
}


def models() -> dict[str, Callable[[], AtomisticModel]]:
    """Name -> builder of each benchmarked orb model (float32, eval mode)."""
    from atomuq.models.adapters.orb import new_orb_model

    return {
        "orb-v3-direct small (tests' config)": lambda: new_orb_model(
            "orb-v3-direct", **SMALL_ORB
        ),
        "orb-v3-direct-20 full size": lambda: new_orb_model(
            "orb-v3-direct", max_num_neighbors=20
        ),
        "bundled molecular-small": lambda: resolve_model("molecular-small"),
    }


#: the small fairchem backbone of the tests (tests/model_kinds.py FAIRCHEM_SMALL)
SMALL_FAIRCHEM = {"sphere_channels": 16, "edge_channels": 16, "hidden_channels": 16, "num_distance_basis": 16,
                  "num_layers": 2, "cutoff": 5.0}


def fairchem_models() -> dict[str, Callable[[], AtomisticModel]]:
    """Name -> builder of each benchmarked fairchem model (float32, eval mode, random weights)."""
    from atomuq.models.adapters.fairchem import new_fairchem_model

    return {
        "fairchem esen-direct small (tests' config)": lambda: new_fairchem_model("esen-direct", **SMALL_FAIRCHEM),
        "fairchem esen-direct full size (eSEN-sm)": lambda: new_fairchem_model("esen-direct"),
        "fairchem uma-direct small (tests' config)": lambda: new_fairchem_model("uma-direct", **SMALL_FAIRCHEM,
                                                                               num_experts=2),
        "fairchem uma-direct full size (UMA-S, 32 experts)": lambda: new_fairchem_model("uma-direct", num_experts=32),
    }


#: orb-v3-direct at the bundled model's sizes: latent 64, MLP hidden 64 with one hidden layer, 2 message-passing steps,
#: 5 Å cutoff, no stress head; 120 neighbours at most (water at 1 g/cm³ has at most 64 within 5 Å: no edge is dropped,
#: both models see the same ~54 edges per atom)
MATCHED_ORB = {"latent_dim": 64, "base_mlp_hidden_dim": 64, "base_mlp_depth": 1, "head_mlp_hidden_dim": 64,
               "head_mlp_depth": 1, "num_message_passing_steps": 2, "has_stress": False}


def matched_models() -> dict[str, Callable[[], AtomisticModel]]:
    """Name -> builder: orb-models' GNS (Orb-v3 direct) at the width, depth, cutoff and neighbours of the bundled
    model, and the bundled model itself."""
    from atomuq.models.adapters.orb import new_orb_model

    return {
        "orb-v3-direct GNS matched to molecular-small": lambda: new_orb_model(
            "orb-v3-direct", radius=5.0, max_num_neighbors=120, **MATCHED_ORB),
        "bundled molecular-small": lambda: resolve_model("molecular-small"),
    }


FAMILIES = {"orb": (models, "orb-models", "adapters"), "fairchem": (fairchem_models, "fairchem-core", "adapters_fairchem"),
            "matched": (matched_models, "orb-models", "adapters_matched")}


def time_case(model: AtomisticModel, n_atoms: int, repeats: int) -> dict:
    """Minimum seconds of a direct-only evaluation and of a Force Delta evaluation, interleaved."""
    atoms = water_box(n_atoms)
    batch = Batch.from_atoms([atoms], dtype=model.dtype)

    def direct() -> None:
        with torch.inference_mode():
            model(batch)

    def with_force_delta() -> None:
        force_delta(evaluate(model, batch, conservative=True).detach(), batch)

    direct()
    with_force_delta()  # warm-up
    best = interleaved_minima({"direct": direct, "force_delta": with_force_delta}, repeats)
    d, f = best["direct"]["cpu"], best["force_delta"]["cpu"]
    return {"n_atoms": len(atoms), "direct_s": d, "force_delta_s": f, "ratio": f / d,
            "direct_wall_s": best["direct"]["wall"], "force_delta_wall_s": best["force_delta"]["wall"]}


def write_results(rows: list[dict], meta: dict, stem: str) -> None:
    """Write the rows so far to results/STEM.json and STEM.md (after every row: a long run keeps what it measured)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "Seconds: CPU time of the one thread, minimum over interleaved repeats (wall time in the JSON).",
        "",
        "| model | parameters | atoms | direct-only s | Force Delta s | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']:,} | {r['n_atoms']} | {r['direct_s']:.4f} | "
            f"{r['force_delta_s']:.4f} | {r['ratio']:.2f} |"
        )
    (RESULTS / f"{stem}.md").write_text("\n".join(lines) + f"\n\n{meta}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=None,
                        help="atoms per water box (default 100 1000; --family matched: 100 1000 10000)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="orb")
    parser.add_argument("--only", nargs="*", default=None, help="benchmark only the models whose name contains one of these")
    args = parser.parse_args()
    builders, package, stem = FAMILIES[args.family]
    reuse_freed_memory()  # as atomuq's commands do
    sizes = args.sizes or ([100, 1000, 10000] if args.family == "matched" else [100, 1000])
    from importlib.metadata import version

    meta = {
        "torch": torch.__version__,
        package.replace("-", "_"): version(package),
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }
    torch.manual_seed(0)
    built = {name: build().eval() for name, build in builders().items()
             if not args.only or any(part in name for part in args.only)}
    rows = []
    for n in sizes:  # every model at the small size first
        for name, model in built.items():
            params = sum(p.numel() for p in model.parameters())
            row = {"model": name, "parameters": params, **time_case(model, n, args.repeats)}
            rows.append(row)
            print(
                f"{name:38s} {row['n_atoms']:5d} atoms  direct {row['direct_s']:.4f} s  "
                f"Force Delta {row['force_delta_s']:.4f} s  ratio {row['ratio']:.2f}",
                flush=True,
            )
            write_results(rows, meta, stem)
    print((RESULTS / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
