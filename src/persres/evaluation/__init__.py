"""Measuring: the CLIP/DINO scorers (``evaluate``, ``measure``), CustomConcept101 (``cc101``,
``categories``), the benchmark's plan and runner (``benchmark_plan``, ``benchmark``), its results
(``results``, ``result_rows``) and report (``report``), and the macro class (``macro``). The top of the
library: it imports every layer below it, and only the front ends import it.
"""
