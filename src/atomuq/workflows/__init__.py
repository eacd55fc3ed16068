"""Workflows built on models and UQ methods: scoring, MD, attack, fine-tuning, benchmarks."""
