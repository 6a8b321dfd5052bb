"""Experiments made of many runs: scaling-law grids (scale.py)."""
