"""fairchem-core 2.x direct-force models (eSEN, UMA) through the atomuq model protocol.

A model is fairchem's own HydraModel built from a fairchem model configuration (the
`model_config` dict fairchem stores in its checkpoints: a backbone and named heads, each a
fairchem class path with its keyword arguments); ARCHITECTURES holds the direct-force ones
atomuq knows, with random weights. The graph fairchem's backbone reads is built from atomuq's
Batch: neighbour indices and integer cell shifts from atomuq.core.neighbors (vesin, fairchem's
cutoff and nearest-`max_neighbors` rule), handed over as edge_index / cell_offsets with
fairchem's own graph generation switched off (otf_graph=False), so that fairchem computes every
edge vector in torch from batch.positions and batch.cell: conservative forces, virial and
rotational gradient come once, by autograd, from atomuq.models.derivatives.

Outputs: energy (eV), direct forces (eV/Å) from the direct force head, node features
(N, sphere_channels): the l = 0 (rotation-invariant) channels of the backbone's final node
embedding, for LTAU. No direct stress. Weights come only from a local file (an atomuq-fairchem
file written by save_fairchem); nothing here downloads (fairchem's released checkpoints live on
the Hugging Face hub, which atomuq never contacts).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.core.neighbors import build_graph
from atomuq.models.adapters import require
from atomuq.models.checkpoint import NO_DOWNLOADS, read_payload, save_payload
from atomuq.models.protocol import AtomisticModel, ModelOutput

FORMAT = "atomuq-fairchem"
_UMA = "fairchem.core.models.uma"
#: fairchem's direct force head and the energy heads that go with it (no gradient-force heads)
DIRECT_FORCE_HEAD = f"{_UMA}.escn_md.Linear_Force_Head"
ENERGY_HEADS = (f"{_UMA}.escn_md.MLP_Energy_Head", f"{_UMA}.escn_md.Linear_Energy_Head")
MOE_WRAPPER = f"{_UMA}.escn_moe.DatasetSpecificMoEWrapper"
#: UMA's tasks (datasets), each with its own expert of every head
UMA_TASKS = ("omat", "omol", "oc20", "odac", "omc")

_ESEN_BACKBONE = {
    "model": f"{_UMA}.escn_md.eSCNMDBackbone",
    "max_num_elements": 100,
    "sphere_channels": 128,
    "lmax": 2,
    "mmax": 2,
    "otf_graph": True,
    "max_neighbors": 300,
    "cutoff": 6.0,
    "edge_channels": 128,
    "distance_function": "gaussian",
    "num_distance_basis": 64,
    "direct_forces": True,
    "regress_forces": True,
    "regress_stress": False,
    "num_layers": 4,
    "hidden_channels": 128,
    "norm_type": "rms_norm_sh",
    "act_type": "gate",
    "ff_type": "grid",
    "use_dataset_embedding": False,
    "always_use_pbc": False,
}

#: direct-force fairchem architectures (fairchem model_config dicts), sized like the released small models
ARCHITECTURES: dict[str, dict[str, Any]] = {
    # eSEN small, direct forces (as esen-sm-direct): 4 layers, 128 sphere channels, lmax 2, 6 Å
    "esen-direct": {
        "backbone": _ESEN_BACKBONE,
        "heads": {
            "energy": {"module": f"{_UMA}.escn_md.MLP_Energy_Head"},
            "forces": {"module": DIRECT_FORCE_HEAD},
        },
    },
    # UMA small with a direct force head (UMA's direct pre-training stage): mixture of linear experts,
    # dataset embedding and per-task experts of both heads
    "uma-direct": {
        "backbone": {
            **_ESEN_BACKBONE,
            "model": f"{_UMA}.escn_moe.eSCNMDMoeBackbone",
            "use_dataset_embedding": True,
            "dataset_mapping": {task: task for task in UMA_TASKS},
            "num_experts": 8,
            "use_composition_embedding": True,
            "chg_spin_emb_type": "rand_emb",
        },
        "heads": {
            "energy": {"module": MOE_WRAPPER, "head_cls": f"{_UMA}.escn_md.MLP_Energy_Head",
                       "dataset_mapping": {task: task for task in UMA_TASKS}, "wrap_property": False},
            "forces": {"module": MOE_WRAPPER, "head_cls": DIRECT_FORCE_HEAD,
                       "dataset_mapping": {task: task for task in UMA_TASKS}, "wrap_property": False},
        },
    },
}


@functools.cache
def fairchem_version() -> str:
    """The installed fairchem-core version; MissingPackageError names the extra to install."""
    require("fairchem.core.models.base", "fairchem")
    from importlib.metadata import version

    return version("fairchem-core")


def fairchem_config(architecture: str, **backbone: Any) -> dict[str, Any]:
    """The fairchem model_config of an ARCHITECTURES name, with backbone keyword arguments overridden."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown fairchem architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}")
    config = copy.deepcopy(ARCHITECTURES[architecture])
    config["backbone"].update(backbone)
    return config


def build_hydra(config: dict[str, Any]) -> torch.nn.Module:
    """fairchem's HydraModel from a model_config (backbone + heads), randomly initialised, in eval mode."""
    fairchem_version()
    from fairchem.core.models.base import HydraModel

    return HydraModel(backbone=config["backbone"], heads=config["heads"]).eval()


def _head_class(head: dict[str, Any]) -> str:
    """The fairchem class path of a head config (through a per-task expert wrapper)."""
    return head.get("head_cls", head["module"]) if head["module"] == MOE_WRAPPER else head["module"]


def check_config(config: dict[str, Any], where: str) -> None:
    """Raise ModelFileError unless config is a direct-force fairchem model atomuq can run (energy + direct forces)."""
    heads = config.get("heads") or {}
    backbone = config.get("backbone") or {}
    classes = {name: _head_class(head) for name, head in heads.items()}
    if not any(c in ENERGY_HEADS for c in classes.values()) or DIRECT_FORCE_HEAD not in classes.values():
        raise ModelFileError(
            f"{where}: atomuq runs fairchem models with an energy head ({', '.join(ENERGY_HEADS)}) and the direct "
            f"force head {DIRECT_FORCE_HEAD}; this one has {classes}. Gradient-force heads (MLP_EFS_Head) "
            "differentiate inside fairchem and are not supported")
    if not backbone.get("direct_forces", False) or backbone.get("regress_stress", False):
        raise ModelFileError(f"{where}: the fairchem backbone must have direct_forces=True and regress_stress=False")


def new_fairchem_model(architecture: str, task: str = "omat", **backbone: Any) -> FairchemModel:
    """A randomly initialised fairchem architecture (ARCHITECTURES name, backbone overrides) as an atomuq model."""
    config = fairchem_config(architecture, **backbone)
    return FairchemModel(build_hydra(config), config, architecture, task).eval()


class FairchemModel(AtomisticModel):
    """A fairchem HydraModel with an energy head and a direct force head, as an atomuq model.

    task: the fairchem dataset name given to models with a dataset embedding (UMA: omat, omol,
    oc20, odac, omc; materials: omat); charge (e) and spin multiplicity are 0 for every structure.
    """

    def __init__(self, hydra: torch.nn.Module, config: dict[str, Any], architecture: str, task: str = "omat") -> None:
        super().__init__()
        check_config(config, architecture)
        self.hydra = hydra
        self.config = copy.deepcopy(config)
        self.architecture = architecture
        backbone = hydra.backbone
        backbone.otf_graph = False  # edges come from atomuq (edge_index, cell_offsets)
        self.cutoff = float(backbone.cutoff)
        self.max_neighbors = int(backbone.max_neighbors)
        self.elements = list(range(1, int(backbone.max_num_elements)))
        self.uses_task = bool(backbone.use_dataset_embedding)
        if self.uses_task and task not in backbone.dataset_mapping:
            raise ModelFileError(f"{architecture}: task {task!r} is not one of the model's {sorted(backbone.dataset_mapping)}")
        self.task = task
        names = {_head_class(head): name for name, head in config["heads"].items()}
        self.force_head = names[DIRECT_FORCE_HEAD]
        self.energy_head = next(names[c] for c in ENERGY_HEADS if c in names)

    @property
    def has_direct_forces(self) -> bool:
        return True

    @property
    def has_node_features(self) -> bool:
        return True

    def atomic_data(self, batch: Batch) -> Any:
        """fairchem's AtomicData for the batch, its edge vectors to be computed from batch.positions and batch.cell."""
        from fairchem.core.datasets.atomic_data import AtomicData

        numbers = batch.numbers
        if bool(((numbers < 1) | (numbers >= self.elements[-1] + 1)).any()):
            raise InputError(f"atomic numbers must lie in 1..{self.elements[-1]} for this fairchem model")
        mixed = batch.pbc.any(dim=1) & ~batch.pbc.all(dim=1)
        if bool(mixed.any()):
            raise InputError(
                f"structures {torch.nonzero(mixed).flatten().tolist()} are periodic along some axes only; "
                "fairchem models take fully periodic or non-periodic structures (pad with vacuum)")
        graph = build_graph(batch, self.cutoff, self.max_neighbors)
        b, device = batch.num_structures, batch.device
        zeros = torch.zeros(b, dtype=torch.long, device=device)
        data = AtomicData(
            pos=batch.positions,
            atomic_numbers=numbers.long(),
            cell=batch.cell,
            pbc=batch.pbc,
            natoms=batch.atoms_per_structure,
            edge_index=torch.stack([graph.neighbors, graph.centers]),  # fairchem: source j, target i
            cell_offsets=graph.shifts,
            nedges=torch.bincount(graph.edge_batch, minlength=b),
            charge=zeros,
            spin=zeros,
            fixed=batch.fixed.long(),
            tags=torch.zeros(batch.num_atoms, dtype=torch.long, device=device),
            batch=batch.structure_index,
            sid=[""] * b,
            dataset=[self.task] * b,
        )
        return data

    def forward(self, batch: Batch) -> ModelOutput:
        """Energy (B,) eV, direct forces (N, 3) eV/Å and invariant node features (N, sphere_channels)."""
        data = self.atomic_data(batch)
        emb = self.hydra.backbone(data)
        heads = self.hydra.output_heads
        energy = _unwrap(heads[self.energy_head](data, emb), "energy", self.task)
        forces = _unwrap(heads[self.force_head](data, emb), "forces", self.task)
        features = emb["node_embedding"][:, 0, :]
        return ModelOutput(energy=energy.to(batch.dtype), forces=forces.to(batch.dtype), node_features=features)


def _unwrap(outputs: dict[str, Any], key: str, task: str) -> torch.Tensor:
    """A head's output tensor: key, or TASK_key of a per-task expert wrapper; a {key: tensor} dict is opened."""
    value = outputs[key] if key in outputs else outputs[f"{task}_{key}"]
    return value[key] if isinstance(value, dict) else value


def save_fairchem(model: FairchemModel, path: str | Path) -> Path:
    """Write an atomuq-fairchem file: the fairchem model_config, the task and the weights."""
    return save_payload(path, FORMAT, model.hydra, fairchem_version=fairchem_version(), architecture=model.architecture,
                        task=model.task, model_config=model.config)


def load_fairchem(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                  task: str | None = None) -> FairchemModel:
    """Load an atomuq-fairchem file (save_fairchem) as an atomuq model; dtype defaults to the stored weights' dtype,
    task to the stored one."""
    path = Path(path)
    fairchem_version()
    payload = read_payload(path, "fairchem model file", NO_DOWNLOADS)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not an atomuq-fairchem file (write one with atomuq.models.adapters.fairchem."
                             "save_fairchem); fairchem's own inference checkpoints are not read yet")
    config = payload["model_config"]
    check_config(config, str(path))
    state = payload["state_dict"]
    hydra = build_hydra(config)
    stored = next((state[n].dtype for n, _ in hydra.named_parameters() if n in state), torch.float32)  # the weights'
    if stored != torch.float32:  # fairchem keeps some precomputed buffers in float64: never round them through float32
        hydra = hydra.to(dtype=stored)
    try:
        hydra.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(f"{path}: weights do not match the stored fairchem configuration: {exc}") from exc
    if dtype is not None and dtype != stored:
        hydra = hydra.to(dtype=dtype)
    hydra = hydra.eval()
    for p in hydra.parameters():
        p.requires_grad_(False)
    model = FairchemModel(hydra, config, payload["architecture"], task or payload["task"])
    model.source = f"fairchem:{path}"
    return model.to(device).eval()
