"""Experiments that train models and report figures: `cellgate experiment NAME`."""
