"""Evaluation: demo data, answer scoring and the unlearning demo."""
