"""Ablations: one change at a time against a baseline, early stopping, verdicts against seed noise.

spec.py   the ablation file -> one validated raysmol config per (variant, seed) trial (pure)
tune.py   (ray) the trials as a Ray Tune experiment, each trial a Ray Train run; resume; `raysmol ablate`
report.py per-variant table, verdicts and plots from a sweep directory (pure)
signal.py which metrics carry signal early: monotonicity, seed noise, margin over random, ranking stability
"""
