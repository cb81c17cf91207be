"""Benchmarks behind `recloop bench ...`."""
