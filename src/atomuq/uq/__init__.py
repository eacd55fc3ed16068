"""Uncertainty methods. Each returns a UQResult: per-atom and per-structure arrays named by the output
schema (core.schema), which states their units and whether higher means less trusted."""
