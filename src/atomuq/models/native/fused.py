"""The native model's forward pass over edge chunks, with an exact hand-derived backward for dE/d(edge vectors).

Why: the edge work (E ~ 54 N for water at a 5 Å cutoff) dominates time and memory. Autograd keeps
every per-edge activation of the whole graph and runs each operation over all E edges at once;
here the edges are processed in chunks that stay in cache (a 53,836 x 64 matmul runs at 40
GFLOPS on one core here, in 8,192-row chunks at 95), and the backward keeps only what it needs:

- node-level work (embedding, node updates, energy head) runs under autograd, one small graph
  per layer; the edge-level work (edge encoder, edge MLPs, messages, force head) runs without
  autograd, and its backward is written out with the kernels autograd itself uses
  (addmm, silu_backward, native_layer_norm_backward, index_add), so the gradient is exact;
- the edge bases (Bessel, spherical harmonics, envelopes, ZBL) are cheap: their backward is a
  local autograd call per chunk on a recomputed forward;
- per edge and MLP block the backward needs the pre-activation a, the LayerNorm input o and
  its mean and inverse deviation ("save" mode: (L + 1)(H + D + 2) floats per edge); where that
  does not fit in memory they are recomputed from the stored edge states ("recompute" mode,
  about one more forward of the edge blocks);
- the direct force head needs no gradient, so it costs a forward only and shares the loop
  that starts the backward.

The energy depends on positions and cell only through the edge vectors, so dE/dr and the strain
derivative dE/dg follow from dE/d(edge vectors) (core.neighbors.edge_gradients).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from atomuq.core.batch import Batch, scatter_mean, scatter_sum
from atomuq.core.errors import MemoryShortage
from atomuq.core.memory import available_memory
from atomuq.core.neighbors import Graph, build_graph, edge_gradients, edge_vectors
from atomuq.models.native.basis import (
    bessel_basis, bessel_basis_and_derivative, polynomial_envelope, polynomial_envelope_derivative, spherical_harmonics,
    spherical_harmonics_vjp,
)
from atomuq.models.protocol import ModelOutput

#: edges per chunk on the CPU: (chunk, 64) float32 activations of 2 MiB stay in the 1-2 MiB per-core L2/L3
CPU_CHUNK = 8192
#: edges per chunk on an accelerator: large enough that kernel launches do not dominate
ACCELERATOR_CHUNK = 1 << 20
#: edges per piece of the geometry (per-edge scalars and short vectors: larger pieces, fewer operations)
GEOMETRY_CHUNK = 1 << 16
#: integer bytes of the neighbour list per edge (centres, neighbours, owning structure)
INDEX_BYTES_PER_EDGE = 24
#: below this estimate the memory at hand is not checked (bytes)
SMALL_BYTES = 256 * 2**20
#: factor on the estimated memory for what the estimate leaves out (allocator fragmentation, small tensors)
MEMORY_MARGIN = 1.15


@dataclass
class FusedResult:
    """What one fused evaluation returns: the forward outputs and, when asked, dE/dr (N, 3) eV/Å and
    dE/dg (B, 3, 3) eV (None without a gradient or strain); mode is "save", "recompute" or "forward"."""

    output: ModelOutput
    position_gradient: torch.Tensor | None
    strain_gradient: torch.Tensor | None
    mode: str


class _Block:
    """Linear -> SiLU -> Linear (-> LayerNorm) on edges, with extra per-edge terms added before the SiLU."""

    def __init__(self, first: nn.Linear, second: nn.Linear, norm: nn.LayerNorm | None) -> None:
        self.w1, self.b1 = first.weight, first.bias
        self.w2, self.b2 = second.weight, second.bias
        self.norm = norm

    @classmethod
    def of_encoder(cls, seq: nn.Sequential) -> "_Block":
        return cls(seq[0], seq[2], seq[3] if len(seq) > 3 else None)

    @classmethod
    def of_edge_mlp(cls, module: nn.Module) -> "_Block":
        tail = module.tail
        return cls(module.edge_in, tail[1], tail[2] if len(tail) > 2 else None)

    def pre_activation(self, x: torch.Tensor, gathered: tuple[tuple[torch.Tensor, torch.Tensor], ...],
                       out: torch.Tensor | None = None) -> torch.Tensor:
        """a = x W1^T + b1 + sum of P[index] (EdgeMLP.forward); with gathered terms the first table must hold the
        bias already (P + b1, see with_bias): it is gathered into the output and the product added in place."""
        if not gathered:
            return torch.addmm(self.b1, x, self.w1.t(), **({"out": out} if out is not None else {}))
        (table, index), *others = gathered
        a = torch.index_select(table, 0, index, **({"out": out} if out is not None else {}))
        a.addmm_(x, self.w1.t())
        for table, index in others:
            a += table.index_select(0, index)
        return a

    def with_bias(self, table: torch.Tensor) -> torch.Tensor:
        """A per-atom table with the first layer's bias added (for pre_activation)."""
        return table + self.b1

    def rest(self, a: torch.Tensor, out: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(y, o, mean, rstd) from the pre-activation: o = silu(a) W2^T + b2, y = LayerNorm(o) (or o)."""
        s = F.silu(a)
        o = torch.addmm(self.b2, s, self.w2.t(), out=out) if out is not None else torch.addmm(self.b2, s, self.w2.t())
        if self.norm is None:
            return o, o, None, None
        y, mean, rstd = torch.native_layer_norm(o, self.norm.normalized_shape, self.norm.weight, self.norm.bias,
                                                self.norm.eps)
        return y, o, mean, rstd

    def backward(self, grad_y: torch.Tensor, a: torch.Tensor, o: torch.Tensor, mean: torch.Tensor,
                 rstd: torch.Tensor) -> torch.Tensor:
        """dE/da from dE/dy (the caller applies W1: dE/dx = dE/da W1)."""
        grad_o = torch.ops.aten.native_layer_norm_backward(
            grad_y, o, self.norm.normalized_shape, mean, rstd, self.norm.weight, self.norm.bias, [True, False, False])[0]
        return torch.ops.aten.silu_backward(grad_o.mm(self.w2), a)


class _Tape:
    """Per-edge tensors kept from the forward for the backward: preallocated, written chunk by chunk."""

    def __init__(self, n_edges: int, blocks: int, hidden: int, latent: int, like: torch.Tensor) -> None:
        new = lambda *shape: like.new_empty(shape)  # noqa: E731
        self.a = [new(n_edges, hidden) for _ in range(blocks)]
        self.o = [new(n_edges, latent) for _ in range(blocks)]
        self.mean = [new(n_edges, 1) for _ in range(blocks)]
        self.rstd = [new(n_edges, 1) for _ in range(blocks)]

    def put(self, k: int, s: slice, mean: torch.Tensor, rstd: torch.Tensor) -> None:
        """Store LayerNorm statistics (a and o are written in place through out=)."""
        self.mean[k][s] = mean
        self.rstd[k][s] = rstd

    def get(self, k: int, s: slice) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.a[k][s], self.o[k][s], self.mean[k][s], self.rstd[k][s]


def bytes_per_edge(model: nn.Module, mode: str, itemsize: int = 4) -> int:
    """Bytes one edge holds at the peak of a fused evaluation of this model (mode "forward", "save" or "recompute"):
    the neighbour list, the geometry, the edge states and, with a gradient, the adjoints and the tape."""
    cfg = model.config
    d, h, layers = cfg.latent, cfg.hidden, cfg.num_layers
    bases = cfg.num_bessel + (cfg.lmax + 1) ** 2
    floats = 14 + bases  # shifts, vectors, lengths, unit vectors (twice), envelope, radial and angular bases
    if mode == "forward":
        floats += 2 * d  # two alternating edge-state buffers
    else:
        floats += layers * d + (d if layers > 1 else 0) + 1 + bases + 3  # states, adjoints, dE/d(edge vectors)
        if mode == "save":
            floats += (layers + 1) * (h + d + 2)
    return INDEX_BYTES_PER_EDGE + floats * itemsize


def estimated_memory(model: nn.Module, n_edges: int, mode: str) -> int:
    """Bytes a fused evaluation of n_edges edges needs beyond what the process holds (per-edge part plus the
    chunk temporaries)."""
    itemsize = torch.finfo(model.dtype).bits // 8
    cfg = model.config
    width = max(cfg.latent, cfg.hidden, cfg.num_bessel * (cfg.lmax + 1) ** 2)
    temporaries = 16 * min(n_edges, CPU_CHUNK) * width * itemsize
    return int(MEMORY_MARGIN * (n_edges * bytes_per_edge(model, mode, itemsize) + temporaries))


def chunk_size(model: nn.Module, device: torch.device) -> int:
    """Edges per chunk: the model's edge_chunk if set, else a default for the device."""
    chunk = getattr(model, "edge_chunk", None)
    if chunk:
        return int(chunk)
    return CPU_CHUNK if device.type == "cpu" else ACCELERATOR_CHUNK


def choose_mode(model: nn.Module, batch: Batch, n_edges: int, gradient: bool) -> str:
    """The fastest mode whose memory fits what is available; MemoryShortage (naming sizes and what to do) if none."""
    modes = ("save", "recompute") if gradient else ("forward",)
    forced = getattr(model, "fused_mode", None) if gradient else None
    if forced is not None:
        if forced not in modes:
            raise ValueError(f"fused_mode must be one of {modes} here, got {forced!r}")
        modes = (forced,)
    if estimated_memory(model, n_edges, modes[0]) < SMALL_BYTES:
        return modes[0]  # no need to ask the system (MD steps of small structures: many calls a second)
    free = available_memory(batch.device)
    for mode in modes:
        if free is None or estimated_memory(model, n_edges, mode) < free:
            return mode
    need = estimated_memory(model, n_edges, modes[-1])
    what = "the Force Delta (direct and conservative forces)" if gradient else "a forward pass"
    size = f"{batch.num_atoms:,} atoms and {n_edges:,} edges within {model.cutoff:g} Å"
    if batch.num_structures == 1:
        subject, advice = f"a structure of {size}", "run it where more memory is free, or split it"
    else:
        subject = f"{batch.num_structures} structures with {size}"
        advice = "score fewer structures at a time (--batch-size 1) or run where more memory is free"
    raise MemoryShortage(
        f"{what} of {subject} needs about {need / 2**30:.1f} GiB ({need / max(batch.num_atoms, 1) / 1024:.0f} KiB "
        f"per atom) but {free / 2**30:.1f} GiB is available on {batch.device}; {advice}")


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class _Geometry:
    """Edge geometry of the whole graph in the native model's formulas: lengths, unit vectors, envelope, radial and
    angular bases (computed once, in large pieces: the many small operations on per-edge scalars cost little there),
    the outer product per chunk, and the exact backward by hand (basis.bessel_basis_and_derivative,
    polynomial_envelope_derivative, spherical_harmonics_vjp), with the bases' adjoints gathered per chunk."""

    def __init__(self, model: nn.Module, vectors: torch.Tensor, gradient: bool) -> None:
        cfg = self.cfg = model.config
        n_edges = len(vectors)
        self.vectors = vectors
        self.lengths = torch.linalg.norm(vectors, dim=-1)
        self.unit = vectors / self.lengths[:, None]
        # (3, E) and (K, E) copies: the per-component operations of the harmonics run on contiguous vectors
        self.unit_columns = self.unit.t().contiguous()
        self.envelope = polynomial_envelope(self.lengths, cfg.cutoff)
        n_angular = (cfg.lmax + 1) ** 2
        self.radial = vectors.new_empty(n_edges, cfg.num_bessel)
        self.angular = vectors.new_empty(n_edges, n_angular)
        for s in _chunks(n_edges, GEOMETRY_CHUNK):
            torch.mul(bessel_basis(self.lengths[s], cfg.cutoff, cfg.num_bessel), self.envelope[s, None],
                      out=self.radial[s])
            self.angular[s] = spherical_harmonics(self.unit_columns[:, s].t(), cfg.lmax)
        if gradient:
            self.grad_radial = vectors.new_empty(n_edges, cfg.num_bessel)
            self.grad_angular_columns = vectors.new_empty(n_angular, n_edges)
            self.grad_envelope = vectors.new_zeros(n_edges)

    def edge_input(self, s: slice) -> torch.Tensor:
        """(c, num_bessel (lmax+1)²) radial x angular of a chunk."""
        return (self.radial[s, :, None] * self.angular[s, None, :]).flatten(1)

    def take_gradient(self, s: slice, grad_input: torch.Tensor) -> None:
        """Keep dE/d(radial) and dE/d(angular) of a chunk from dE/d(edge input)."""
        grad = grad_input.view(len(grad_input), self.cfg.num_bessel, -1)
        torch.bmm(grad, self.angular[s, :, None], out=self.grad_radial[s, :, None])
        self.grad_angular_columns[:, s] = torch.sum(grad * self.radial[s, :, None], dim=1).t()

    def vector_gradient(self) -> torch.Tensor:
        """dE/d(edge vectors) (E, 3) from the bases' and the envelope's adjoints."""
        cfg = self.cfg
        out = self.vectors.new_empty(self.vectors.shape)
        for s in _chunks(len(out), GEOMETRY_CHUNK):
            lengths, unit, envelope = self.lengths[s], self.unit[s], self.envelope[s]
            basis, basis_derivative = bessel_basis_and_derivative(lengths, cfg.cutoff, cfg.num_bessel)
            envelope_derivative = polynomial_envelope_derivative(lengths, cfg.cutoff)
            radial_derivative = basis_derivative * envelope[:, None] + basis * envelope_derivative[:, None]
            grad_length = (torch.linalg.vecdot(self.grad_radial[s], radial_derivative)
                           + self.grad_envelope[s] * envelope_derivative)
            grad_unit = spherical_harmonics_vjp(self.unit_columns[:, s].t(), self.grad_angular_columns[:, s].t(),
                                                cfg.lmax)
            # u = v / |v|: dE/dv = (dE/dr - (dE/du . u) / r) u + (dE/du) / r
            along = grad_length - torch.linalg.vecdot(grad_unit, unit) / lengths
            torch.addcmul(grad_unit / lengths[:, None], along[:, None], unit, out=out[s])
        return out


def _zbl(model: nn.Module, batch: Batch, graph: Graph, vectors: torch.Tensor, lengths: torch.Tensor,
         gradient: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """ZBL energy per structure (B,) eV and, with gradient, the close edges and their dE/d(edge vectors).

    Only edges shorter than twice the largest covalent radius present can have a pair energy (the ZBL switch is
    exactly zero beyond the sum of the two radii), so only those are evaluated: the same sum, a few % of the edges."""
    numbers = batch.numbers
    reach = 2.0 * float(model.zbl.radii[numbers].max()) if len(numbers) else 0.0
    close = torch.nonzero(lengths < reach).flatten()
    energy = vectors.new_zeros(batch.num_structures)
    with torch.enable_grad() if gradient else nullcontext():
        v = vectors.index_select(0, close).requires_grad_(gradient)
        pair = model.zbl(torch.linalg.norm(v, dim=-1), numbers[graph.centers[close]], numbers[graph.neighbors[close]])
        total = pair.sum()
    energy.index_add_(0, graph.edge_batch[close], pair.detach())
    if not gradient:
        return energy, None, None
    (grad,) = torch.autograd.grad(total, [v])
    return energy, close, 0.5 * grad


def fused_evaluate(model: nn.Module, batch: Batch, *, gradient: bool = True, strain: bool = False,
                   direct: bool = True, graph: Graph | None = None) -> FusedResult:
    """The native model's outputs for a batch (energy eV, direct forces eV/Å, ...) computed over edge chunks and,
    with gradient, dE/dr (N, 3) eV/Å and (with strain) dE/dg (B, 3, 3) eV by the exact backward.

    direct=False skips the direct force head (ModelOutput.forces is None): the cost of the conservative forces alone.
    graph: the batch's neighbour list if already built.
    """
    with torch.no_grad():
        return _run(model, batch, gradient, strain, direct, graph)


def _run(model: nn.Module, batch: Batch, gradient: bool, strain: bool, direct: bool, graph: Graph | None
         ) -> FusedResult:
    cfg = model.config
    n, b = batch.num_atoms, batch.num_structures
    species = model.species(batch.numbers)
    if graph is None:
        graph = build_graph(batch, cfg.cutoff, cfg.max_neighbors)
    n_edges = graph.num_edges
    mode = choose_mode(model, batch, n_edges, gradient)
    size = chunk_size(model, batch.device)
    vectors = edge_vectors(batch, graph)
    geometry = _Geometry(model, vectors, gradient)
    lengths, unit, envelope = geometry.lengths, geometry.unit, geometry.envelope
    centers, neighbors = graph.centers, graph.neighbors
    encoder = _Block.of_encoder(model.edge_encoder)
    blocks = [_Block.of_edge_mlp(layer.edge_mlp) for layer in model.layers]
    n_layers = len(blocks)
    like = vectors
    save = mode == "save"
    tape = _Tape(n_edges, n_layers + 1, cfg.hidden, cfg.latent, like) if save else None
    # edge states: with a gradient e_1..e_L are all kept (envelope adjoint of the messages, recompute), else two alternate
    states = [like.new_empty(n_edges, cfg.latent) for _ in range(n_layers if gradient else 2)]

    def state(k: int) -> torch.Tensor:
        return states[k - 1] if gradient else states[k % 2]

    # forward: layer by layer over edge chunks; node updates under autograd (one small graph per layer)
    h = model.node_encoder(model.embedding(species))
    h_leaves: list[torch.Tensor | None] = [None]  # h_0 does not depend on positions
    m_leaves: list[torch.Tensor] = []
    h_outs: list[torch.Tensor] = []
    projections: list[tuple[torch.Tensor, torch.Tensor]] = []
    for k, (layer, block) in enumerate(zip(model.layers, blocks)):
        pn, pc = block.with_bias(layer.edge_mlp.neighbor_in(h)), layer.edge_mlp.center_in(h)
        projections.append((pn, pc))
        messages = like.new_zeros(n, cfg.latent)
        e_next = state(k + 1)
        for s in _chunks(n_edges, size):
            if k == 0:  # geometry, edge encoder and the first layer in one pass over the chunk
                edge_in = geometry.edge_input(s)
                a = encoder.pre_activation(edge_in, (), out=tape.a[0][s] if save else None)
                e, o, mean, rstd = encoder.rest(a, out=tape.o[0][s] if save else None)
                if save:
                    tape.put(0, s, mean, rstd)
            else:
                e = state(k)[s]
            a = block.pre_activation(e, ((pn, neighbors[s]), (pc, centers[s])), out=tape.a[k + 1][s] if save else None)
            y, o, mean, rstd = block.rest(a, out=tape.o[k + 1][s] if save else None)
            if save:
                tape.put(k + 1, s, mean, rstd)
            torch.add(e, y, out=e_next[s])
            messages.index_add_(0, centers[s], e_next[s] * envelope[s, None])
        with torch.enable_grad() if gradient else nullcontext():
            h_in = h if k == 0 else h.detach().requires_grad_(gradient)
            m_in = messages.requires_grad_(gradient)
            h_out = h_in + layer.node_mlp(torch.cat([h_in, m_in / layer.avg_neighbors], dim=-1))
        if k > 0:
            h_leaves.append(h_in)
        m_leaves.append(m_in)
        h_outs.append(h_out)
        h = h_out.detach()

    with torch.enable_grad() if gradient else nullcontext():
        h_top = h.detach().requires_grad_(gradient)
        atom_energy = model.energy_head(h_top).squeeze(-1) * model.energy_scale
        head_energy = atom_energy.sum()
    energy = scatter_sum(atom_energy.detach() + model.reference_energies[species], batch.structure_index, b)
    zbl_close = zbl_grad = None
    if model.zbl is not None and n_edges:
        pair_energy, zbl_close, zbl_grad = _zbl(model, batch, graph, vectors, lengths, gradient)
        energy = energy + 0.5 * pair_energy

    force_acc = like.new_zeros(n, 3) if direct else None
    head = _Block(model.force_head.edge_in, model.force_head.tail[1], None)
    pf = head.with_bias(model.force_head.neighbor_in(h)) if direct else None
    top = state(n_layers)

    head_out, head_bias = head.w2[0], head.b2

    def force_chunk(s: slice) -> None:
        # a positive weight pushes the centre away from its neighbour (NativeModel.forward)
        hidden = F.silu(head.pre_activation(top[s], ((pf, neighbors[s]),)), inplace=True)
        weights = torch.mv(hidden, head_out).add_(head_bias).mul_(envelope[s])
        force_acc.index_add_(0, centers[s], unit[s] * weights[:, None])

    position_gradient = strain_gradient = None
    if not gradient:
        if direct:
            for s in _chunks(n_edges, size):
                force_chunk(s)
    else:
        # backward: layer by layer from the top; the force head shares the first loop
        (grad_h,) = torch.autograd.grad(head_energy, [h_top])
        grad_edges = like.new_empty(n_edges, cfg.latent) if n_layers > 1 else None
        grad_env = geometry.grad_envelope
        for k in reversed(range(n_layers)):
            inputs = [m_leaves[k]] if k == 0 else [h_leaves[k], m_leaves[k]]
            grads = torch.autograd.grad([h_outs[k]], inputs, [grad_h])
            grad_m = grads[-1]
            block, layer = blocks[k], model.layers[k]
            pn, pc = projections[k]
            grad_pn = like.new_zeros(pn.shape) if k > 0 else None
            grad_pc = like.new_zeros(pc.shape) if k > 0 else None
            for s in _chunks(n_edges, size):
                if direct and k == n_layers - 1:
                    force_chunk(s)
                if save:
                    saved = tape.get(k + 1, s)
                    if k == 0:
                        enc_saved = tape.get(0, s)
                elif k == 0:  # recompute the edge encoder and the first layer
                    edge_in = geometry.edge_input(s)
                    a0 = encoder.pre_activation(edge_in, ())
                    e0, o0, mean0, rstd0 = encoder.rest(a0)
                    enc_saved = (a0, o0, mean0, rstd0)
                    a = block.pre_activation(e0, ((pn, neighbors[s]), (pc, centers[s])))
                    saved = (a,) + block.rest(a)[1:]
                else:
                    a = block.pre_activation(state(k)[s], ((pn, neighbors[s]), (pc, centers[s])))
                    saved = (a,) + block.rest(a)[1:]
                # dE/de_{k+1}: from layer k+1 (residual and its edge MLP) plus the envelope-weighted messages
                g = grad_m.index_select(0, centers[s])
                grad_env[s] += torch.linalg.vecdot(state(k + 1)[s], g)
                if k < n_layers - 1:
                    grad_e = torch.addcmul(grad_edges[s], g, envelope[s, None])
                else:
                    grad_e = g.mul_(envelope[s, None])
                grad_a = block.backward(grad_e, *saved)
                if k > 0:
                    torch.addmm(grad_e, grad_a, block.w1, out=grad_edges[s])
                    grad_pn.index_add_(0, neighbors[s], grad_a)
                    grad_pc.index_add_(0, centers[s], grad_a)
                else:
                    grad_e0 = torch.addmm(grad_e, grad_a, block.w1)
                    grad_in = encoder.backward(grad_e0, *enc_saved).mm(encoder.w1)
                    geometry.take_gradient(s, grad_in)
            if k > 0:
                mlp = layer.edge_mlp
                grad_h = grads[0] + grad_pn.mm(mlp.neighbor_in.weight) + grad_pc.mm(mlp.center_in.weight)
        grad_vectors = geometry.vector_gradient()
        if zbl_close is not None:
            grad_vectors.index_add_(0, zbl_close, zbl_grad)
        position_gradient, strain_gradient = edge_gradients(graph, vectors, grad_vectors, n, b, strain)

    forces = None
    if direct:
        forces = -force_acc * model.force_scale
        forces = forces - scatter_mean(forces, batch.structure_index, b)[batch.structure_index]
    stress = None
    if model.stress_head is not None:
        stress = model.stress_head(scatter_mean(h, batch.structure_index, b))
    output = ModelOutput(energy=energy, forces=forces, stress=stress, node_features=h,
                         confidence_logits=model.confidence_head(h))
    return FusedResult(output, position_gradient, strain_gradient, mode)
