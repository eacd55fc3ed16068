"""metatomic models (PET, PET-MAD, UPET, ...) through the atomuq model protocol.

A metatomic model is an exported TorchScript file with named outputs. atomuq uses
`energy` (eV, per structure), the direct force head `non_conservative_force` (eV/Å, per atom;
the older name `non_conservative_forces` is accepted) when the model has one, and the per-atom
features `feature` (older: `features`) for LTAU. As metatomic's own ASE calculator does, the net
force of the direct head is removed per structure. The neighbour lists the model requests are
built by atomuq.core.neighbors (vesin) and their distance vectors recomputed in torch from
batch.positions and batch.cell, so that atomuq.models.derivatives differentiates the energy.
Weights come only from a local file: nothing here downloads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from atomuq.core.batch import Batch, scatter_mean
from atomuq.core.errors import ModelFileError
from atomuq.core.neighbors import Graph, build_graph, edge_vectors
from atomuq.models.adapters import require
from atomuq.models.protocol import AtomisticModel, ModelOutput

FORCE_OUTPUTS = ("non_conservative_force", "non_conservative_forces")
FEATURE_OUTPUTS = ("feature", "features")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _first_present(names: tuple[str, ...], available: Any) -> str | None:
    return next((name for name in names if name in available), None)


def half_list_mask(graph: Graph) -> torch.Tensor:
    """(E,) mask keeping one of each pair i->j / j->i of a full neighbour list (i < j, or i == j with a positive shift)."""
    i, j, s = graph.centers, graph.neighbors, graph.shifts
    first_nonzero = torch.where(
        s[:, 0] != 0, s[:, 0], torch.where(s[:, 1] != 0, s[:, 1], s[:, 2])
    )
    return (i < j) | ((i == j) & (first_nonzero > 0))


class MetatomicModel(AtomisticModel):
    """A loaded metatomic AtomisticModel as an atomuq model (energy, optional direct forces, features)."""

    def __init__(self, model: torch.nn.Module, source: str = "") -> None:
        super().__init__()
        self.mta = model
        capabilities = model.capabilities()
        outputs = capabilities.outputs
        if "energy" not in outputs:
            raise ModelFileError(
                f"{source}: the metatomic model has no 'energy' output (it has {sorted(outputs)})"
            )
        self.force_output = _first_present(FORCE_OUTPUTS, outputs)
        self.feature_output = _first_present(FEATURE_OUTPUTS, outputs)
        self.elements = sorted(int(z) for z in capabilities.atomic_types)
        self.cutoff = float(capabilities.interaction_range)
        self._dtype = DTYPES[capabilities.dtype]
        self.requests = list(model.requested_neighbor_lists())
        self.source = source

    @property
    def has_direct_forces(self) -> bool:
        return self.force_output is not None

    @property
    def has_node_features(self) -> bool:
        return self.feature_output is not None

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _systems(self, batch: Batch) -> list:
        mta = require("metatomic.torch", "metatomic")
        mts = require("metatensor.torch", "metatomic")
        ptr = batch.ptr.tolist()
        cell = batch.cell * batch.pbc[:, :, None].to(
            batch.dtype
        )  # metatomic wants zero vectors along open axes
        systems = [
            mta.System(
                types=batch.numbers[ptr[b] : ptr[b + 1]].to(torch.int32),
                positions=batch.positions[ptr[b] : ptr[b + 1]],
                cell=cell[b],
                pbc=batch.pbc[b],
            )
            for b in range(batch.num_structures)
        ]
        for options in self.requests:
            graph = build_graph(batch, options.engine_cutoff("angstrom"))
            vectors = edge_vectors(batch, graph)
            keep = (
                torch.ones_like(graph.centers, dtype=torch.bool)
                if options.full_list
                else half_list_mask(graph)
            )
            for b, system in enumerate(systems):
                mask = keep & (graph.edge_batch == b)
                pairs = torch.cat(
                    [
                        torch.stack([graph.centers[mask], graph.neighbors[mask]], 1)
                        - ptr[b],
                        graph.shifts[mask].round().to(torch.long),
                    ],
                    1,
                ).to(torch.int32)
                block = mts.TensorBlock(
                    values=vectors[mask][:, :, None],
                    samples=mts.Labels(
                        [
                            "first_atom",
                            "second_atom",
                            "cell_shift_a",
                            "cell_shift_b",
                            "cell_shift_c",
                        ],
                        pairs,
                    ),
                    components=[mts.Labels.range("xyz", 3)],
                    properties=mts.Labels.range("distance", 1),
                )
                system.add_neighbor_list(options, block)
        return systems

    def forward(self, batch: Batch) -> ModelOutput:
        """Energy (B,) eV; direct forces (N, 3) eV/Å when the model has them; per-atom features."""
        mta = require("metatomic.torch", "metatomic")
        requested = {
            "energy": mta.ModelOutput(quantity="energy", unit="eV", per_atom=False)
        }
        if self.force_output is not None:
            requested[self.force_output] = mta.ModelOutput(
                quantity="force", unit="eV/Angstrom", per_atom=True
            )
        if self.feature_output is not None:
            requested[self.feature_output] = mta.ModelOutput(per_atom=True)
        options = mta.ModelEvaluationOptions(length_unit="angstrom", outputs=requested)
        out = self.mta(self._systems(batch), options, check_consistency=False)
        energy = out["energy"].block().values.reshape(-1)
        forces = features = None
        if self.force_output is not None:
            forces = self._per_atom(out[self.force_output].block(), batch).reshape(
                batch.num_atoms, 3
            )
            forces = (
                forces
                - scatter_mean(forces, batch.structure_index, batch.num_structures)[batch.structure_index]
            )
        if self.feature_output is not None:
            features = self._per_atom(out[self.feature_output].block(), batch).reshape(
                batch.num_atoms, -1
            )
        return ModelOutput(energy=energy, forces=forces, node_features=features)

    @staticmethod
    def _per_atom(block: Any, batch: Batch) -> torch.Tensor:
        """Per-atom values in atomuq's atom order, from a block with (system, atom) samples."""
        samples = block.samples.values.to(batch.device)
        index = batch.ptr[samples[:, 0].long()] + samples[:, 1].long()
        return block.values[torch.argsort(index)]


def load_metatomic(
    path: str | Path,
    device: str | torch.device = "cpu",
    extensions_directory: str | Path | None = None,
) -> MetatomicModel:
    """Load an exported metatomic model (.pt) from a local file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"{path}: metatomic model file not found (atomuq never downloads models: give a local file)"
        )
    mta = require("metatomic.torch", "metatomic")
    try:
        model = mta.load_atomistic_model(
            str(path), extensions_directory=extensions_directory
        )
    except (
        Exception
    ) as exc:  # metatomic raises RuntimeError / ValueError for bad or foreign files
        raise ModelFileError(
            f"{path}: not a loadable metatomic model ({type(exc).__name__}: {exc})"
        ) from exc
    return MetatomicModel(model, source=f"metatomic:{path}").to(device).eval()
