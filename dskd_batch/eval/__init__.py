"""Evaluation: generate and score a model on held-out data, and compare runs.

:mod:`.evaluate` is the ``evaluate`` and ``report`` stages (sampling over seeds, teacher-forced
NLL, the side-by-side table); :mod:`.scoring` the metrics (Rouge-L, exact match, pass@1 through
:mod:`.sandbox`); :mod:`.compare` the paired bootstrap of one run against another.
"""
