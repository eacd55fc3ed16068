"""The native Orb-v3-style direct-force network.

Edge features: 8 Bessel radial functions times 16 real spherical harmonics (L_max = 3),
times a smooth envelope, encoded by an MLP. Message passing: edge update from the edge and
both end nodes, envelope-weighted sum into the centre, node update; residuals and LayerNorm.
Heads: per-atom energy plus per-element reference energy (and optional ZBL repulsion);
direct forces as a sum over neighbours of learned scalars along the unit bond vectors, with
the net force removed; optional direct stress; a confidence head on detached node features.
Like Orb-v3 the backbone is not rotation-invariant by construction: invariance is learned
(rotation augmentation, equigrad) and measured by the rotational gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from atomuq.core.batch import Batch, scatter_mean, scatter_sum
from atomuq.core.neighbors import build_graph, edge_vectors
from atomuq.models.native.basis import bessel_basis, polynomial_envelope, spherical_harmonics
from atomuq.models.native.config import NativeConfig
from atomuq.models.native.fused import chunk_size, fused_evaluate
from atomuq.models.native.zbl import ZBLRepulsion
from atomuq.models.protocol import AtomisticModel, ModelOutput


def mlp(n_in: int, hidden: int, n_out: int, norm: bool = True) -> nn.Sequential:
    """Two-layer SiLU MLP, optionally followed by LayerNorm."""
    layers: list[nn.Module] = [nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, n_out)]
    if norm:
        layers.append(nn.LayerNorm(n_out))
    return nn.Sequential(*layers)


class EdgeMLP(nn.Module):
    """MLP on the concatenation [e_ij, h_i, h_j] (or [e_ij, h_j]) without building it per edge.

    The first linear layer is split by input block and the node blocks are applied per atom
    before gathering: e W_e + (h W_c)[i] + (h W_n)[j], the same function as Linear(cat(...)) at a
    fraction of the per-edge memory and arithmetic.
    """

    def __init__(self, latent: int, hidden: int, n_out: int, use_center: bool = True, norm: bool = True) -> None:
        super().__init__()
        self.edge_in = nn.Linear(latent, hidden)
        self.center_in = nn.Linear(latent, hidden, bias=False) if use_center else None
        self.neighbor_in = nn.Linear(latent, hidden, bias=False)
        tail: list[nn.Module] = [nn.SiLU(), nn.Linear(hidden, n_out)]
        if norm:
            tail.append(nn.LayerNorm(n_out))
        self.tail = nn.Sequential(*tail)

    def forward(self, e: torch.Tensor, h: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
        # index_select rather than h[idx]: its backward is an index_add, ~12 % faster on CPU
        x = self.edge_in(e) + self.neighbor_in(h).index_select(0, neighbors)
        if self.center_in is not None:
            x = x + self.center_in(h).index_select(0, centers)
        return self.tail(x)


class InteractionLayer(nn.Module):
    """One message-passing step with residual edge and node updates."""

    def __init__(self, latent: int, hidden: int, avg_neighbors: float) -> None:
        super().__init__()
        self.edge_mlp = EdgeMLP(latent, hidden, latent)
        self.node_mlp = mlp(2 * latent, hidden, latent)
        self.avg_neighbors = avg_neighbors

    def forward(self, h: torch.Tensor, e: torch.Tensor, centers: torch.Tensor, neighbors: torch.Tensor,
                envelope: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = e + self.edge_mlp(e, h, centers, neighbors)
        messages = scatter_sum(e * envelope[:, None], centers, h.shape[0]) / self.avg_neighbors
        h = h + self.node_mlp(torch.cat([h, messages], dim=-1))
        return h, e


class NativeModel(AtomisticModel):
    """Compact direct-force model with energy, force, optional stress and confidence heads.

    With own_derivatives (the default) and without autograd (torch.no_grad, inference_mode) forward runs over edge
    chunks where there is more than one chunk of edges (models.native.fused; the plain graph below is as fast for fewer), and
    derivatives.evaluate takes the conservative forces and virial from its exact backward (energy_derivatives);
    with autograd on (training, create_graph) forward is the plain graph below. Runtime settings, not saved:
    edge_chunk (edges per chunk, None: a default for the device), fused_mode (None: "save" where memory allows,
    else "recompute"; tests and benchmarks force one) and own_derivatives (True; False gives the plain graph and
    autograd everywhere, the reference the fused path is tested and timed against).
    """

    #: the exact chunked backward (models.native.fused) instead of autograd where no graph is asked for
    own_derivatives: bool = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # a subclass whose forward does more (logging, instrumentation) must be called: the fused path would bypass
        # it, so it gets autograd unless it sets own_derivatives itself
        if "forward" in cls.__dict__ and "own_derivatives" not in cls.__dict__:
            cls.own_derivatives = False

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.edge_chunk: int | None = None
        self.fused_mode: str | None = None
        self.config = config
        self.cutoff = config.cutoff
        self.elements = list(config.elements)
        lookup = torch.full((119,), -1, dtype=torch.long)
        lookup[torch.tensor(self.elements)] = torch.arange(len(self.elements))
        self.register_buffer("species_index", lookup, persistent=False)
        self.register_buffer("reference_energies", torch.zeros(len(self.elements)))
        self.register_buffer("energy_scale", torch.tensor(1.0))
        self.register_buffer("force_scale", torch.tensor(1.0))
        edges = torch.linspace(0.0, config.confidence_max_error, config.confidence_bins + 1)
        self.confidence_bin_edges = edges  # a persistent buffer (AtomisticModel.confidence_bin_edges)
        #: set by atomuq.models.checkpoint.load_model from the model file
        self.training_data_hash = ""
        self.metadata: dict = {}

        n_edge_in = config.num_bessel * (config.lmax + 1) ** 2
        self.embedding = nn.Embedding(len(self.elements), config.latent)
        self.node_encoder = mlp(config.latent, config.hidden, config.latent)
        self.edge_encoder = mlp(n_edge_in, config.hidden, config.latent)
        self.layers = nn.ModuleList(
            InteractionLayer(config.latent, config.hidden, config.avg_neighbors) for _ in range(config.num_layers)
        )
        self.energy_head = mlp(config.latent, config.hidden, 1, norm=False)
        self.force_head = EdgeMLP(config.latent, config.hidden, 1, use_center=False, norm=False)
        self.stress_head = mlp(config.latent, config.hidden, 6, norm=False) if config.direct_stress else None
        self.confidence_head = mlp(config.latent, config.confidence_hidden, config.confidence_bins, norm=False)
        self.zbl = ZBLRepulsion() if config.zbl else None

    @property
    def has_direct_forces(self) -> bool:
        return True

    @property
    def has_direct_stress(self) -> bool:
        return self.stress_head is not None

    @property
    def has_node_features(self) -> bool:
        return True

    def species(self, numbers: torch.Tensor) -> torch.Tensor:
        """Atomic numbers -> indices into self.elements; raises on an element the model lacks."""
        idx = self.species_index[numbers]
        if (idx < 0).any():
            missing = sorted(set(numbers[idx < 0].tolist()))
            raise ValueError(f"elements {missing} are not supported by this model (elements {self.elements})")
        return idx

    def energy_derivatives(self, batch: Batch, strain: bool) -> tuple[ModelOutput, torch.Tensor, torch.Tensor | None]:
        """Forward outputs, dE/dr (N, 3) eV/Å and with strain dE/dg (B, 3, 3) eV, by the exact chunked backward."""
        result = fused_evaluate(self, batch, gradient=True, strain=strain)
        return result.output, result.position_gradient, result.strain_gradient

    def forward(self, batch: Batch) -> ModelOutput:
        """Energies (B,) eV, direct forces (N, 3) eV/Å, node features, confidence logits, optional stress."""
        cfg = self.config
        graph = build_graph(batch, cfg.cutoff, cfg.max_neighbors)
        if self.own_derivatives and not torch.is_grad_enabled() and graph.num_edges > chunk_size(self, batch.device):
            return fused_evaluate(self, batch, gradient=False, graph=graph).output  # more than one chunk of edges
        n, b = batch.num_atoms, batch.num_structures
        species = self.species(batch.numbers)
        vectors = edge_vectors(batch, graph)
        lengths = torch.linalg.norm(vectors, dim=-1)
        unit = vectors / lengths[:, None]
        envelope = polynomial_envelope(lengths, cfg.cutoff)
        radial = bessel_basis(lengths, cfg.cutoff, cfg.num_bessel) * envelope[:, None]
        angular = spherical_harmonics(unit, cfg.lmax)
        edge_in = (radial[:, :, None] * angular[:, None, :]).flatten(1)

        h = self.node_encoder(self.embedding(species))
        e = self.edge_encoder(edge_in)
        for layer in self.layers:
            h, e = layer(h, e, graph.centers, graph.neighbors, envelope)

        atom_energy = self.energy_head(h).squeeze(-1) * self.energy_scale + self.reference_energies[species]
        energy = scatter_sum(atom_energy, batch.structure_index, b)
        if self.zbl is not None and graph.num_edges:
            pair = self.zbl(lengths, batch.numbers[graph.centers], batch.numbers[graph.neighbors])
            energy = energy + 0.5 * scatter_sum(pair, graph.edge_batch, b)

        weights = self.force_head(e, h, graph.centers, graph.neighbors).squeeze(-1) * envelope
        # a positive weight pushes the centre away from its neighbour
        forces = -scatter_sum(weights[:, None] * unit, graph.centers, n) * self.force_scale
        forces = forces - scatter_mean(forces, batch.structure_index, b)[batch.structure_index]

        stress = None
        if self.stress_head is not None:
            stress = self.stress_head(scatter_mean(h, batch.structure_index, b))
        confidence = self.confidence_head(h.detach())
        return ModelOutput(energy=energy, forces=forces, stress=stress, node_features=h, confidence_logits=confidence)
