"""`distilray tune`: search a config space with Ray Tune, every trial a `distilray train` run.

Submodules, lowest first: `space` (checking a search space, pure), `experiment` (the
experiment directory and best/ export, files only), `summary` (reading an experiment back),
`plots` (its figures), `report` (trials.csv, report.md, report.html) and `search` (the Ray
glue: Tuner, trials, callbacks). This file imports nothing, so importing a pure submodule
never imports Ray.
"""
