"""GLUE metrics, from scikit-learn and scipy, and the GLUE score."""

from __future__ import annotations

from typing import Callable

import numpy as np


def _accuracy(pred, gold) -> float:
    from sklearn.metrics import accuracy_score
    return float(accuracy_score(gold, pred))


def _f1(pred, gold) -> float:
    from sklearn.metrics import f1_score
    return float(f1_score(gold, pred))  # of the positive class (label 1), as GLUE


def _matthews(pred, gold) -> float:
    from sklearn.metrics import matthews_corrcoef
    return float(matthews_corrcoef(gold, pred))


def _pearson(pred, gold) -> float:
    from scipy.stats import pearsonr
    return float(pearsonr(pred, gold)[0]) if np.ptp(pred) > 0 else 0.0


def _spearman(pred, gold) -> float:
    from scipy.stats import spearmanr
    return float(spearmanr(pred, gold)[0]) if np.ptp(pred) > 0 else 0.0


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy, "f1": _f1, "matthews_correlation": _matthews,
    "pearson": _pearson, "spearman": _spearman,
}
"""Metric name -> f(predictions, gold). Classification metrics take label indices; the
correlations take real values. A constant prediction has correlation 0 (not NaN)."""


def compute(names: tuple[str, ...] | list[str], predictions, gold) -> dict[str, float]:
    """The named metrics of ``predictions`` against ``gold``."""
    predictions, gold = np.asarray(predictions), np.asarray(gold)
    return {name: METRICS[name](predictions, gold) for name in names}


def task_score(metrics: dict[str, float], names: tuple[str, ...]) -> float:
    """One number per task, as the leaderboard: the mean of its metrics."""
    return float(np.mean([metrics[n] for n in names]))


def glue_score(scores: dict[str, float]) -> float:
    """The GLUE score: the unweighted mean of the per-task scores (MNLI's is the mean of
    matched and mismatched accuracy). Only tasks present are averaged; the caller says
    which are missing."""
    return float(np.mean(list(scores.values()))) if scores else float("nan")
