"""Evaluation: demo data, answer scoring, and `cmc-edge eval` (what a delta does to each model)."""
