"""Orb-v2 and Orb-v3 models (orb-models) through the atomuq model protocol.

The graph orb's network reads (AtomGraphs) is built from atomuq's Batch: neighbour indices
and integer cell shifts from atomuq.core.neighbors (vesin, the same nearest-`max_num_neighbors`
rule per centre as orb), edge vectors recomputed in torch from batch.positions and batch.cell.
orb's own conservative models differentiate their energy themselves; here the energy is
returned undifferentiated, so atomuq.models.derivatives takes forces, virial and rotational
gradient once, by autograd, for direct and conservative orb models alike.

Outputs: energy (eV, with orb's reference energies and ZBL pair repulsion), direct forces and
stress for direct models (orb's heads plus the ZBL terms, as orb's `predict`), node features
(N, latent_dim) from the last message-passing layer (hidden by orb's calculator, needed by
LTAU), confidence logits (N, 50) over orb's bins of the per-atom force error, which orb
defines as the mean absolute force component error (eV/Å), not the norm atomuq's native
model uses.

orb-models 0.7 (Python >= 3.12) and 0.5.x (Python 3.11) move modules and change small parts
of the API (0.7: released loaders return (model, atoms adapter), the graph settings live on the
adapter, spin is `spin_multiplicity`, absolute energies come in float64); orb_api() hides both
behind one lazy import. Both are tested: 0.5.5 in the project environment, 0.7 in a Python 3.12
side environment (scripts/orb07_side_env.sh). Weights come only from a local file: nothing here
downloads. compile=False by default.
"""

from __future__ import annotations

import functools
import inspect
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.core.neighbors import build_graph, edge_vectors
from atomuq.models.adapters import require
from atomuq.models.checkpoint import NO_DOWNLOADS, read_payload, save_payload
from atomuq.models.protocol import AtomisticModel, ModelOutput

FORMAT = "atomuq-orb"
NUM_ELEMENT_CLASSES = 118  # orb's one-hot atom embedding: index = atomic number
#: architecture builders (random initialisation, any size) by the name atomuq files store
BUILDERS = {
    "orb-v3-direct": "orb_v3_direct_architecture",
    "orb-v3-conservative": "orb_v3_conservative_architecture",
    "orb-v2": "orb_v2_architecture",
}
DEFAULT_RADIUS = 6.0  # Å, every released Orb-v2/v3 model
DEFAULT_MAX_NEIGHBORS = 20


@dataclass(frozen=True)
class OrbAPI:
    """The parts of orb-models atomuq uses, wherever the installed version keeps them."""

    version: str
    AtomGraphs: type
    pretrained: ModuleType
    conservative_class: type

    @property
    def pretrained_models(self) -> dict[str, Callable]:
        """Name -> loader of every released model (orb_models.forcefield.pretrained.ORB_PRETRAINED_MODELS)."""
        return dict(self.pretrained.ORB_PRETRAINED_MODELS)


@functools.cache
def orb_api() -> OrbAPI:
    """Import orb-models lazily (0.7.x or 0.5.x layout); ImportError names the extra to install."""
    require("orb_models", "orb")
    pretrained = require("orb_models.forcefield.pretrained", "orb")
    try:  # orb-models >= 0.6
        from orb_models.common.atoms.batch.graph_batch import AtomGraphs
        from orb_models.forcefield.models.conservative_regressor import (
            ConservativeForcefieldRegressor,
        )
    except ImportError:  # orb-models 0.5.x
        from orb_models.forcefield.base import AtomGraphs
        from orb_models.forcefield.conservative_regressor import (
            ConservativeForcefieldRegressor,
        )
    from importlib.metadata import version

    return OrbAPI(
        version=version("orb-models"),
        AtomGraphs=AtomGraphs,
        pretrained=pretrained,
        conservative_class=ConservativeForcefieldRegressor,
    )


def build_orb_architecture(
    name: str,
    radius: float = DEFAULT_RADIUS,
    max_num_neighbors: int = DEFAULT_MAX_NEIGHBORS,
    **kwargs: Any,
) -> torch.nn.Module:
    """A randomly initialised orb regressor: name in BUILDERS, kwargs of orb's builder (latent_dim, ...)."""
    api = orb_api()
    if name not in BUILDERS:
        raise ValueError(
            f"unknown orb architecture {name!r}; choose one of {sorted(BUILDERS)}"
        )
    builder = getattr(api.pretrained, BUILDERS[name])
    if (
        "system_config" in inspect.signature(builder).parameters
    ):  # 0.5.x keeps the graph settings on the model
        from orb_models.forcefield.atomic_system import SystemConfig

        kwargs["system_config"] = SystemConfig(
            radius=radius, max_num_neighbors=max_num_neighbors
        )
    return builder(device="cpu", **kwargs)


def new_orb_model(
    name: str,
    radius: float = DEFAULT_RADIUS,
    max_num_neighbors: int = DEFAULT_MAX_NEIGHBORS,
    **kwargs: Any,
) -> OrbModel:
    """A randomly initialised orb architecture (BUILDERS name, builder kwargs) wrapped as an atomuq model, in eval mode."""
    orb = build_orb_architecture(name, radius, max_num_neighbors, **kwargs).eval()
    return OrbModel(orb, radius, max_num_neighbors, name, kwargs).eval()


class OrbModel(AtomisticModel):
    """An orb-models regressor (direct or conservative) as an atomuq model.

    radius (Å) and max_num_neighbors are the graph settings the model was trained with;
    charge (e) and spin are passed to models conditioned on them (Orb-v3 OMol), the same for
    every structure.
    """

    def __init__(
        self,
        orb: torch.nn.Module,
        radius: float,
        max_num_neighbors: int,
        architecture: str,
        architecture_kwargs: dict[str, Any] | None = None,
        charge: float = 0.0,
        spin: float = 1.0,
    ) -> None:
        super().__init__()
        self.orb = orb
        self.cutoff = float(radius)
        self.max_num_neighbors = int(max_num_neighbors)
        self.elements = None
        self.architecture = architecture
        self.architecture_kwargs = dict(architecture_kwargs or {})
        self.charge, self.spin = float(charge), float(spin)
        self.conservative_only = isinstance(orb, orb_api().conservative_class)
        conditioner = getattr(orb.model, "conditioner", None)
        self.needs_charge_spin = (
            conditioner is not None
            and type(conditioner).__name__ == "ChargeSpinConditioner"
        )
        if (
            getattr(orb, "coulomb_module", None) is not None
            or "latent_charges" in orb.heads
        ):
            raise ModelFileError(
                f"{architecture}: orb models with a Coulomb module or latent charges are not supported"
            )

    @property
    def has_direct_forces(self) -> bool:
        return "forces" in self.orb.heads and not self.conservative_only

    @property
    def has_direct_stress(self) -> bool:
        return "stress" in self.orb.heads and not self.conservative_only

    @property
    def has_node_features(self) -> bool:
        return True

    @property
    def confidence_bin_edges(self) -> torch.Tensor | None:
        """(51,) edges of orb's confidence bins in eV/Å (mean absolute force component error), or None."""
        return (
            self.orb.heads["confidence"].bin_edges
            if "confidence" in self.orb.heads
            else None
        )

    def atom_graphs(self, batch: Batch) -> Any:
        """orb's AtomGraphs for the batch, edge vectors differentiable in batch.positions and batch.cell."""
        numbers = batch.numbers
        if bool(((numbers < 1) | (numbers >= NUM_ELEMENT_CLASSES)).any()):
            raise InputError(
                f"atomic numbers must lie in 1..{NUM_ELEMENT_CLASSES - 1} for orb models"
            )
        mixed = batch.pbc.any(dim=1) & ~batch.pbc.all(dim=1)
        if bool(mixed.any()):
            raise InputError(
                f"structures {torch.nonzero(mixed).flatten().tolist()} are periodic along some axes "
                "only; orb models take fully periodic or non-periodic structures (pad with vacuum)"
            )
        graph = build_graph(batch, self.cutoff, self.max_num_neighbors)
        b, dtype, device = batch.num_structures, batch.dtype, batch.device
        system = {"cell": batch.cell, "pbc": batch.pbc}
        if self.needs_charge_spin:
            system["total_charge"] = torch.full(
                (b,), self.charge, dtype=dtype, device=device
            )
            system["total_spin"] = torch.full(
                (b,), self.spin, dtype=dtype, device=device
            )  # orb-models 0.5
            system["spin_multiplicity"] = system["total_spin"]  # orb-models 0.7
        return orb_api().AtomGraphs(
            senders=graph.centers,
            receivers=graph.neighbors,
            n_node=batch.atoms_per_structure,
            n_edge=torch.bincount(graph.edge_batch, minlength=b),
            node_features={
                "positions": batch.positions,
                "atomic_numbers": numbers,
                "atomic_numbers_embedding": torch.nn.functional.one_hot(
                    numbers, NUM_ELEMENT_CLASSES
                ).to(dtype),
                "atom_identity": torch.arange(batch.num_atoms, device=device),
            },
            edge_features={
                "vectors": edge_vectors(batch, graph),
                "unit_shifts": graph.shifts,
            },
            system_features=system,
            node_targets={},
            edge_targets={},
            system_targets={},
            system_id=None,
            fix_atoms=batch.fixed if bool(batch.fixed.any()) else None,
            tags=torch.zeros(batch.num_atoms, dtype=dtype, device=device),
            radius=self.cutoff,
            max_num_neighbors=torch.full((b,), self.max_num_neighbors, device=device),
        )

    def forward(self, batch: Batch) -> ModelOutput:
        """Energy (B,) eV (float64 on orb-models >= 0.6, as orb's predict); direct forces (N, 3) eV/Å and stress
        (B, 6) eV/Å³ of direct models; node features; logits."""
        graph = self.atom_graphs(batch)
        heads = self.orb.heads
        features = self.orb.model(graph)["node_features"]
        energy = heads["energy"].predict(features, graph)
        forces = (
            heads["forces"].predict(features, graph) if self.has_direct_forces else None
        )
        stress = (
            heads["stress"].predict(features, graph) if self.has_direct_stress else None
        )
        logits = heads["confidence"](features, graph) if "confidence" in heads else None
        if self.orb.pair_repulsion:
            repulsion = self.orb.pair_repulsion_fn(graph)
            energy = energy + repulsion["energy"]
            if forces is not None and "forces" in repulsion:
                forces = forces + repulsion["forces"]
            if stress is not None and "stress" in repulsion:
                stress = stress + repulsion["stress"]
        if (
            stress is not None
        ):  # orb divides by the cell volume: undefined for molecules
            periodic = batch.pbc.all(dim=1)[:, None]
            stress = torch.where(periodic, stress, torch.zeros_like(stress))
        return ModelOutput(
            energy=energy,
            forces=forces,
            stress=stress,
            node_features=features,
            confidence_logits=logits,
        )


def infer_architecture(path: Path) -> str:
    """The released model a weights file is named after (longest name found in the file name)."""
    names = sorted(orb_api().pretrained_models, key=len, reverse=True)
    for name in names:
        if name in path.name:
            return name
    raise ModelFileError(
        f"{path}: cannot tell the orb architecture from the file name; name it, as in "
        f"orb:ARCHITECTURE:{path} with ARCHITECTURE one of {sorted(orb_api().pretrained_models)}"
    )


def _load_pretrained(name: str, path: Path) -> tuple[torch.nn.Module, float, int]:
    """Run orb's own loader for a released model on a local file, without compiling; (model, radius, max neighbours)."""
    loader = orb_api().pretrained_models[name]
    result = loader(
        weights_path=str(path), device="cpu", precision="float32-highest", compile=False
    )
    if isinstance(
        result, tuple
    ):  # orb-models 0.7: (model, atoms adapter with the graph settings)
        model, adapter = result
        return model, float(adapter.radius), int(adapter.max_num_neighbors)
    return (
        result,
        float(result.system_config.radius),
        int(result.system_config.max_num_neighbors),
    )


def load_orb(
    path: str | Path,
    architecture: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    compile: bool = False,
    architecture_kwargs: dict[str, Any] | None = None,
    radius: float = DEFAULT_RADIUS,
    max_num_neighbors: int | None = None,
    charge: float = 0.0,
    spin: float = 1.0,
) -> OrbModel:
    """Load orb weights from a local file as an atomuq model.

    path: an atomuq-orb file (written by save_orb; self-describing) or a raw orb state dict
    (a released .ckpt). architecture: a released model name (orb-v3-direct-20-omat, orb-v2, ...;
    default: from the file name) or a builder name from BUILDERS with architecture_kwargs.
    """
    path = Path(path)
    payload = read_payload(path, "orb weights file", NO_DOWNLOADS)
    if isinstance(payload, dict) and payload.get("format") == FORMAT:
        architecture = payload["architecture"]
        architecture_kwargs = payload["architecture_kwargs"]
        radius, max_num_neighbors = payload["radius"], payload["max_num_neighbors"]
        state = payload["state_dict"]
    else:
        state = payload
        architecture = architecture or infer_architecture(path)
    architecture_kwargs = dict(architecture_kwargs or {})
    if architecture in BUILDERS:
        max_num_neighbors = max_num_neighbors or DEFAULT_MAX_NEIGHBORS
        orb = build_orb_architecture(
            architecture, radius, max_num_neighbors, **architecture_kwargs
        )
        try:
            orb.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelFileError(
                f"{path}: weights do not match orb architecture {architecture} "
                f"{architecture_kwargs}: {exc}"
            ) from exc
    elif architecture in orb_api().pretrained_models:
        if state is payload:
            orb, radius, default_neighbors = _load_pretrained(architecture, path)
        else:  # an atomuq-orb file wrapping a released architecture: hand orb's loader the bare state dict
            with tempfile.TemporaryDirectory() as tmp:
                raw = Path(tmp) / "weights.ckpt"
                torch.save(state, raw)
                orb, radius, default_neighbors = _load_pretrained(architecture, raw)
        max_num_neighbors = max_num_neighbors or default_neighbors
    else:
        raise ModelFileError(
            f"{path}: unknown orb architecture {architecture!r}; choose a released model "
            f"{sorted(orb_api().pretrained_models)} or a builder {sorted(BUILDERS)}"
        )
    orb = orb.to(dtype=dtype).eval()
    for p in orb.parameters():
        p.requires_grad_(False)
    if compile:
        orb.compile(mode="default", dynamic=True)
    model = OrbModel(
        orb,
        radius,
        max_num_neighbors,
        architecture,
        architecture_kwargs,
        charge=charge,
        spin=spin,
    )
    model.source = f"orb:{architecture}:{path}"
    return model.to(device).eval()


def save_orb(model: OrbModel, path: str | Path) -> Path:
    """Write an atomuq-orb file: orb weights plus the architecture and graph settings to rebuild them."""
    return save_payload(path, FORMAT, model.orb, orb_models_version=orb_api().version, architecture=model.architecture,
                        architecture_kwargs=model.architecture_kwargs, radius=model.cutoff,
                        max_num_neighbors=model.max_num_neighbors)
