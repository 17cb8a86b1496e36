"""Benchmarks for the performance targets (see bench/README.md)."""
