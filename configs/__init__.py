"""Experiment configs: one file per family, `get_config(variant)` with named variants."""
