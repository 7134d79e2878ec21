"""Benchmarks: measured side by side with what they are compared against, in one run."""
