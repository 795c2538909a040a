"""Evaluation harness: synthetic long-context suites, perplexity, fidelity against dense, reports.

* :func:`run_eval` — the ``mpckv eval`` grid (suite × length × method × budget), resumable;
* :func:`fidelity` — top-1 agreement and KL against dense on a fixed continuation, for any checkpoint;
* :func:`write_report` — the ``docs/RESULTS.md`` page from eval output directories.
"""

from mpckv.evals.config import MODES, Cell, EvalConfig
from mpckv.evals.fidelity import fidelity, fidelity_prompts
from mpckv.evals.report import results_markdown, write_report
from mpckv.evals.runner import load_results, run_cell, run_eval
from mpckv.evals.suites import SUITES

__all__ = [
    "MODES",
    "SUITES",
    "Cell",
    "EvalConfig",
    "fidelity",
    "fidelity_prompts",
    "load_results",
    "results_markdown",
    "run_cell",
    "run_eval",
    "write_report",
]
