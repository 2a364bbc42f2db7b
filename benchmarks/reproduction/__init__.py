r"""Reproducing the DHP paper's table: a small package behind ``benchmarks/reproduce.py`` (run the
searches and the grid) and ``benchmarks/results.py`` (docs/RESULTS.md from the run records).

One job per module: ``naming`` (protocols, variants, names), ``records`` (run summaries),
``stats`` (paired differences and noise verdicts), ``plots``, ``report`` (the sections of
RESULTS.md), ``jobs`` (which runs a search or a grid needs, and their strengths) and ``runs``
(training them, resumably, one or several at a time).
"""
