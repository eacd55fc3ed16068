"""Configuration of the native model (all sizes in one place)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class NativeConfig:
    """Sizes and options of the Orb-v3-style network.

    cutoff: Å. num_bessel, lmax: edge basis (8 and 3 in Orb-v3). latent: width of node and
    edge features. hidden: width of the MLPs. num_layers: message-passing steps.
    max_neighbors: keep only the nearest k edges per atom (None: unlimited).
    avg_neighbors: constant that normalises summed messages. direct_stress: add a stress head.
    zbl: add the fixed ZBL pair repulsion. confidence_bins / confidence_max_error (eV/Å):
    the confidence head's equal-width error bins on [0, max]; the last bin also takes larger errors.
    confidence_hidden: width of the confidence MLP (128 in Orb-v3).
    """

    elements: tuple[int, ...] = (1, 6, 7, 8)
    cutoff: float = 5.0
    num_bessel: int = 8
    lmax: int = 3
    latent: int = 128
    hidden: int = 128
    num_layers: int = 3
    max_neighbors: int | None = None
    avg_neighbors: float = 16.0
    direct_stress: bool = False
    zbl: bool = True
    confidence_bins: int = 50
    confidence_max_error: float = 0.3
    confidence_hidden: int = 128

    def __post_init__(self) -> None:
        if len(self.elements) == 0 or len(set(self.elements)) != len(self.elements):
            raise ValueError(f"elements must be a non-empty list of distinct atomic numbers, got {self.elements}")
        if any(not 1 <= z <= 118 for z in self.elements):
            raise ValueError(f"atomic numbers must be in 1..118, got {self.elements}")
        if self.cutoff <= 0 or self.num_layers < 1 or self.latent < 1 or self.hidden < 1:
            raise ValueError("cutoff, num_layers, latent and hidden must be positive")
        if self.max_neighbors is not None and self.max_neighbors < 1:
            raise ValueError("max_neighbors must be positive or None")
        object.__setattr__(self, "elements", tuple(int(z) for z in self.elements))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for saving (tuples become lists)."""
        d = asdict(self)
        d["elements"] = list(self.elements)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NativeConfig":
        """Build from a dict; unknown keys are an error naming them."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown native-model config keys {unknown}; known keys: {sorted(known)}")
        data = dict(data)
        if "elements" in data:
            data["elements"] = tuple(data["elements"])
        return cls(**data)


PRESETS: dict[str, dict[str, Any]] = {
    "small": dict(latent=64, hidden=64, num_layers=2, confidence_hidden=64),
    "default": dict(latent=128, hidden=128, num_layers=3),
}
