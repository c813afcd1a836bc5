"""Analyses built on HookedVLM: spatial index, knockout and ablation, attribution."""
