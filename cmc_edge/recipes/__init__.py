"""Recipes: programs written with the pipeline (forget, demo, JSON), over one shared scaffold."""
