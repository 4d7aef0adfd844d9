"""Benchmarks: each prints a table and records its figures, the command and the machine in BENCHMARKS.md (one section per benchmark)."""
