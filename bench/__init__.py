"""Benchmarks: they print figures and write JSON; tests never assert on wall-clock time."""
