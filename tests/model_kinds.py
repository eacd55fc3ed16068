"""Small random-weight models of the optional third-party kinds (orb, metatomic PET), built in seconds.

The optional packages are imported inside the builders, so importing this module never fails;
tests call pytest.importorskip before using a builder.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from ase import Atoms
from ase.build import bulk, molecule

def molecule_and_silicon() -> list[Atoms]:
    """A rattled ethanol molecule and a rattled periodic Si cell (neighbours across the faces; more than 20
    neighbours within 6 Å): the structures the adapter tests run every model kind on."""
    ethanol = molecule("CH3CH2OH")
    ethanol.rattle(0.05, seed=1)
    silicon = bulk("Si", "diamond", a=5.43, cubic=True)
    silicon.rattle(0.05, seed=2)
    return [ethanol, silicon]


#: a small Orb-v3 configuration (orb-models builder keyword arguments)
ORB_SMALL = {
    "latent_dim": 32,
    "base_mlp_hidden_dim": 64,
    "head_mlp_hidden_dim": 32,
    "num_message_passing_steps": 2,
}

#: a small PET configuration (metatrain hypers)
PET_SMALL = {
    "d_pet": 16,
    "d_head": 16,
    "d_node": 32,
    "d_feedforward": 32,
    "num_heads": 2,
    "num_attention_layers": 1,
    "num_gnn_layers": 2,
}


def small_orb(kind: str = "orb-v3-direct", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised small orb model (an atomuq OrbModel) of architecture `kind`."""
    from atomuq.models.adapters.orb import new_orb_model

    torch.manual_seed(seed)
    kwargs = ORB_SMALL if kind != "orb-v2" else {"num_message_passing_steps": 1}
    return new_orb_model(kind, **kwargs).to(dtype)


def orb_atoms_adapter(model):
    """orb-models' own ASE-to-graph conversion with an atomuq OrbModel's graph settings: graph(atoms) -> AtomGraphs.

    orb-models >= 0.6 keeps the radius and neighbour limit on an atoms adapter, 0.5.x on the model's system_config."""
    try:
        from orb_models.forcefield.forcefield_adapter import ForcefieldAtomsAdapter
    except ImportError:  # orb-models 0.5.x
        from orb_models.forcefield.atomic_system import ase_atoms_to_atom_graphs

        return lambda atoms: ase_atoms_to_atom_graphs(atoms, model.orb.system_config)
    adapter = ForcefieldAtomsAdapter(radius=model.cutoff, max_num_neighbors=model.max_num_neighbors)
    return lambda atoms: adapter.from_ase_atoms(atoms)


def orb_calculator(model):
    """orb-models' own ASE calculator (ORBCalculator, on the cpu) for the network inside an atomuq OrbModel."""
    try:
        from orb_models.forcefield.forcefield_adapter import ForcefieldAtomsAdapter
        from orb_models.forcefield.inference.calculator import ORBCalculator
    except ImportError:  # orb-models 0.5.x
        from orb_models.forcefield.calculator import ORBCalculator

        return ORBCalculator(model.orb, device="cpu")
    adapter = ForcefieldAtomsAdapter(radius=model.cutoff, max_num_neighbors=model.max_num_neighbors)
    return ORBCalculator(model.orb, adapter, device="cpu")


def small_pet(seed: int = 0, dtype: torch.dtype = torch.float64):
    """A randomly initialised metatrain PET with energy and non_conservative_force heads, for H C N O."""
    from metatrain.pet import PET
    from metatrain.utils.architectures import get_default_hypers
    from metatrain.utils.data import DatasetInfo
    from metatrain.utils.data.target_info import get_energy_target_info, get_generic_target_info

    hypers = get_default_hypers("pet")["model"]
    hypers.update(PET_SMALL)
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6, 7, 8],
        targets={
            "energy": get_energy_target_info("energy", {"quantity": "energy", "unit": "eV"}),
            "non_conservative_force": get_generic_target_info(
                "non_conservative_force",
                {
                    "quantity": "force",
                    "unit": "eV/A",
                    "type": {"cartesian": {"rank": 1}},
                    "num_subtargets": 1,
                    "sample_kind": "atom",
                },
            ),
        },
    )
    torch.manual_seed(seed)
    return PET(hypers, info).to(dtype)


def export_pet(path: str | Path, seed: int = 0) -> str:
    """Export a small random PET as a metatomic model file at path; returns the path as a string."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small_pet(seed).export().save(str(path))
    return str(path)


#: a small fairchem eSEN / UMA backbone (fairchem backbone keyword arguments over the architecture's)
FAIRCHEM_SMALL = {
    "sphere_channels": 16,
    "edge_channels": 16,
    "hidden_channels": 16,
    "num_distance_basis": 16,
    "num_layers": 2,
    "cutoff": 5.0,
}


def small_fairchem(architecture: str = "esen-direct", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised small fairchem direct-force model (an atomuq FairchemModel)."""
    from atomuq.models.adapters.fairchem import new_fairchem_model

    torch.manual_seed(seed)
    extra = {"num_experts": 2} if architecture.startswith("uma") else {}
    model = new_fairchem_model(architecture, **FAIRCHEM_SMALL, **extra)
    # fairchem keeps some precomputed buffers in float64: a round trip through float32 would round them
    return model if dtype == torch.float32 else model.to(dtype)
