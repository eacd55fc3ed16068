"""Uncertainty methods. Each returns a UQResult: per-atom and per-structure arrays, units stated,
higher meaning less trusted."""
