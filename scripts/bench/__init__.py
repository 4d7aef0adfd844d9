"""Benchmarks: each prints a table and appends its figures, the command and the machine to BENCHMARKS.md."""
