"""Measurements shared by tests, benchmarks and ablations."""
