"""The bundled compact Orb-v3-style direct-force model."""

from atomuq.models.native.config import NativeConfig
from atomuq.models.native.model import NativeModel

__all__ = ["NativeConfig", "NativeModel"]
