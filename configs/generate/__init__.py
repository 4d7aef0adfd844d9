"""Configs of the generation experiment (experiments/generate.py)."""
