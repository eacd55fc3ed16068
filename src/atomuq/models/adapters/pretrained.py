"""Public pretrained models whose weights ship inside their wheels: CHGNet 0.3.0 and SevenNet-0, conservative only.

Both are trained on PBE(+U) Materials Project relaxations (MPtrj): they are third-party ensemble
members and LTAU descriptor sources on materials, not models of atomuq's GFN1-xTB labels. They
have no direct force head, so the Force Delta is not defined for them (has_direct_forces False);
their forces are -dE/dr taken by atomuq.models.derivatives, like every atomuq model.

- CHGNet (chgnet): the graph (atom graph within 6 Å and the bond graph of 3-body angles) is built
  by CHGNet's own converter on a pymatgen Structure, for indices and integer images only; the
  fractional coordinates and lattice CHGNet reads are then replaced by torch tensors computed from
  batch.positions and batch.cell (frac = r h^-1, so that CHGNet's r = frac h is r again and every
  bond vector is differentiable in positions and cell). CHGNet predicts energy per atom; the
  energy here is per structure. A molecule is put in a cubic box with more than one cutoff of
  vacuum. Node features: CHGNet's atom features before the last convolution (64 per atom, what
  CHGNet returns as atom_fea).
- SevenNet-0 (sevenn, the 11 Jul 2024 checkpoint 7net-0): the edges (5 Å) come from
  atomuq.core.neighbors and the edge vectors from atomuq.core.neighbors.edge_vectors; SevenNet's
  modules run up to the total energy, without its own force output. Node features: the
  rotation-invariant (0e) channels of the last interaction block.

Nothing here downloads: both checkpoints are files of the installed packages (a name SevenNet
would fetch from the network is refused). Install: pip install 'atomuq[pretrained]'.
"""

from __future__ import annotations

import contextlib
import functools
import io
from pathlib import Path
from typing import Any

import torch

from atomuq.core.batch import Batch
from atomuq.core.errors import InputError, ModelFileError
from atomuq.core.neighbors import build_graph, edge_vectors
from atomuq.models.adapters import require
from atomuq.models.protocol import AtomisticModel, ModelOutput

#: extra vacuum (Å) around a molecule beyond CHGNet's cutoff, in the box CHGNet needs
MOLECULE_MARGIN = 2.0


def _check_periodicity(batch: Batch, name: str) -> None:
    mixed = batch.pbc.any(dim=1) & ~batch.pbc.all(dim=1)
    if bool(mixed.any()):
        raise InputError(f"structures {torch.nonzero(mixed).flatten().tolist()} are periodic along some axes only; "
                         f"{name} takes fully periodic or non-periodic structures (pad with vacuum)")


def _check_elements(batch: Batch, elements: list[int], name: str) -> None:
    from ase.data import chemical_symbols

    unknown = sorted(set(batch.numbers.unique().tolist()) - set(elements))
    if unknown:
        raise InputError(f"{name} does not know element(s) {', '.join(chemical_symbols[z] for z in unknown)}")


# --------------------------------------------------------------------------------------------
# CHGNet


class CHGNetModel(AtomisticModel):
    """CHGNet (a pretrained chgnet.model.CHGNet) as a conservative atomuq model."""

    def __init__(self, chgnet: torch.nn.Module, name: str = "chgnet") -> None:
        super().__init__()
        self.chgnet = chgnet
        self.converter = chgnet.graph_converter
        self.cutoff = float(self.converter.atom_graph_cutoff)
        self.elements = list(range(1, int(chgnet.atom_embedding.embedding.num_embeddings) + 1))
        self.source = name

    @property
    def has_node_features(self) -> bool:
        return True

    def _box(self, batch: Batch, b: int, positions: torch.Tensor) -> torch.Tensor:
        """The lattice (3, 3) Å CHGNet sees for structure b: its cell, or a vacuum box for a molecule."""
        if bool(batch.pbc[b].all()):
            return batch.cell[b]
        extent = float((positions.max(0).values - positions.min(0).values).max()) if len(positions) else 0.0
        side = extent + self.cutoff + MOLECULE_MARGIN
        return torch.eye(3, dtype=positions.dtype, device=positions.device) * side

    def graphs(self, batch: Batch) -> list[Any]:
        """CHGNet's CrystalGraphs of the batch, with coordinates and lattices differentiable in positions and cell."""
        from pymatgen.core import Lattice, Structure

        _check_periodicity(batch, "CHGNet")
        _check_elements(batch, self.elements, "CHGNet")
        graphs = []
        ptr = batch.ptr.tolist()
        for b in range(batch.num_structures):
            positions = batch.positions[ptr[b]:ptr[b + 1]]
            lattice = self._box(batch, b, positions)
            numbers = batch.numbers[ptr[b]:ptr[b + 1]].tolist()
            structure = Structure(Lattice(lattice.detach().cpu().double().numpy()), numbers,
                                  positions.detach().cpu().double().numpy(), coords_are_cartesian=True)
            graph = self.converter(structure, graph_id=str(b))
            graph.lattice = lattice
            graph.atom_frac_coord = positions @ torch.linalg.inv(lattice)
            graph.neighbor_image = graph.neighbor_image.to(positions.dtype)
            graphs.append(graph)
        return graphs

    def forward(self, batch: Batch) -> ModelOutput:
        """Energy (B,) eV (CHGNet's energy per atom times the atom count) and node features (N, 64)."""
        from chgnet.model.model import BatchedGraph

        chgnet, graphs = self.chgnet, self.graphs(batch)
        # CHGNet.forward without its float32 cast of the composition: the same steps in the model's dtype
        batched = BatchedGraph.from_graphs(graphs, bond_basis_expansion=chgnet.bond_basis_expansion,
                                           angle_basis_expansion=chgnet.angle_basis_expansion)
        out = chgnet._compute(batched, return_atom_feas=True)
        per_atom = out["e"].reshape(-1)
        composition = chgnet.composition_model
        if composition is not None:
            per_atom = per_atom + composition._get_energy(composition._assemble_graphs(graphs).to(per_atom.dtype))
        energy = per_atom * batch.atoms_per_structure.to(per_atom.dtype) if chgnet.is_intensive else per_atom
        return ModelOutput(energy=energy.to(batch.dtype), node_features=torch.cat(list(out["atom_fea"]), dim=0))


def load_chgnet(version: str = "0.3.0", device: str | torch.device = "cpu") -> CHGNetModel:
    """CHGNet from the checkpoint inside the chgnet package (0.3.0: MPtrj), as an atomuq model in eval mode."""
    model_module = require("chgnet.model", "pretrained")
    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints its parameter count
        chgnet = model_module.CHGNet.load(model_name=version, use_device="cpu", verbose=False)
    for p in chgnet.parameters():
        p.requires_grad_(False)
    model = CHGNetModel(chgnet.eval(), "chgnet" if version == "0.3.0" else f"chgnet-{version}")
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------
# SevenNet

#: the SevenNet modules that turn the energy into forces and stress inside SevenNet (atomuq differentiates itself)
_SEVENN_FORCE_MODULES = ("force_output",)


@functools.cache
def _sevenn_keys() -> Any:
    require("sevenn", "pretrained")
    import sevenn._keys as keys

    return keys


class SevenNetModel(AtomisticModel):
    """A SevenNet AtomGraphSequential (SevenNet-0) as a conservative atomuq model."""

    def __init__(self, sevennet: torch.nn.Module, name: str = "sevennet-0") -> None:
        super().__init__()
        keys = _sevenn_keys()
        modules = {k: m for k, m in sevennet._modules.items() if k not in _SEVENN_FORCE_MODULES}
        if "edge_embedding" not in modules or keys.PRED_TOTAL_ENERGY not in _energy_outputs(modules):
            raise ModelFileError(f"{name}: not a SevenNet energy model atomuq can read")
        self.sevennet = sevennet
        self.sevennet.set_is_batch_data(True)
        self.cutoff = float(sevennet.cutoff)
        self.elements = sorted(int(z) for z in sevennet.type_map)
        self.source = name
        # the node features: input of the readout (the last interaction block's output)
        self._readout = "reduce_input_to_hidden"

    @property
    def has_node_features(self) -> bool:
        return True

    def forward(self, batch: Batch) -> ModelOutput:
        """Energy (B,) eV and the invariant node features (N, F) of the last interaction block."""
        keys = _sevenn_keys()
        _check_periodicity(batch, "SevenNet")
        _check_elements(batch, self.elements, "SevenNet")
        graph = build_graph(batch, self.cutoff)
        data: dict[str, Any] = {
            keys.ATOMIC_NUMBERS: batch.numbers.long(),
            keys.NODE_FEATURE: batch.numbers.long(),
            keys.POS: batch.positions,
            keys.EDGE_IDX: torch.stack([graph.centers, graph.neighbors]),  # SevenNet: vec = pos[dst] - pos[src] + shift
            keys.EDGE_VEC: edge_vectors(batch, graph),
            keys.BATCH: batch.structure_index,
            keys.NUM_ATOMS: batch.atoms_per_structure,
        }
        data = self.sevennet._preprocess(data)
        features = None
        for name, module in self.sevennet._modules.items():
            if name in _SEVENN_FORCE_MODULES:
                continue
            if name == self._readout:
                features = data[keys.NODE_FEATURE]
            data = module(data)
            if name == "onehot_idx_to_onehot":  # SevenNet's one-hot embedding is float32 whatever the model's dtype
                data = {k: v.to(batch.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                        for k, v in data.items()}
        energy = data[keys.PRED_TOTAL_ENERGY].reshape(-1)
        return ModelOutput(energy=energy.to(batch.dtype), node_features=_scalars(self.sevennet, features))


def _energy_outputs(modules: dict[str, torch.nn.Module]) -> set[str]:
    """The data keys SevenNet modules write their reductions to (key_output of AtomReduce modules)."""
    return {getattr(m, "key_output", None) for m in modules.values()} - {None}


def _scalars(sevennet: torch.nn.Module, features: torch.Tensor | None) -> torch.Tensor | None:
    """The 0e (invariant) columns of the readout's input features, from its irreps."""
    if features is None:
        return None
    from e3nn.o3 import Irreps

    irreps = Irreps(sevennet.get_irreps_in("reduce_input_to_hidden"))
    columns, start = [], 0
    for mul, ir in irreps:
        width = mul * ir.dim
        if ir.l == 0 and ir.p == 1:
            columns.append(features[:, start:start + width])
        start += width
    return torch.cat(columns, dim=1)


#: the SevenNet checkpoints that ship inside the sevenn wheel, by atomuq short name
SEVENNET_SHIPPED = {"sevennet-0": "SEVENNET_0_11Jul2024"}


def load_sevennet(name: str = "sevennet-0", device: str | torch.device = "cpu") -> SevenNetModel:
    """A SevenNet checkpoint shipped inside the sevenn package (SevenNet-0), as an atomuq model in eval mode."""
    require("sevenn", "pretrained")
    from sevenn import _const, util

    pretrained = SEVENNET_SHIPPED.get(name)
    if pretrained is None:
        raise ModelFileError(f"{name}: atomuq reads only the SevenNet checkpoints shipped in the sevenn package "
                             f"({', '.join(SEVENNET_SHIPPED)}); the others are downloaded by sevenn, which atomuq never does")
    path = Path(getattr(_const, pretrained))
    if not path.is_file():
        raise ModelFileError(f"{name}: the checkpoint {path} is not in the installed sevenn package "
                             "(atomuq never downloads weights)")
    checkpoint = util.load_checkpoint(str(path))
    sevennet = checkpoint.build_model()
    for p in sevennet.parameters():
        p.requires_grad_(False)
    return SevenNetModel(sevennet.eval(), name).to(device).eval()

