"""The three non-lingp rows of the comparison: the source network as is, last-layer retraining, full fine-tuning.

Each method takes the trained source network, the labelled target examples and the target test images, and returns
class probabilities (n_test, 10) as a float64 host array plus a dict of what it chose.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

from lingp_core.demo.network import fine_tune, penultimate_features, predict_proba

__all__ = ["LAST_LAYER_CS", "full_fine_tuning", "last_layer_retraining", "source_as_is"]

LAST_LAYER_CS = (0.01, 0.1, 1.0, 10.0, 100.0)
"""Inverse L2 strengths searched by cross-validation on the labelled target examples (scikit-learn's C)."""

FINE_TUNE_STEPS = 50
FINE_TUNE_LR = 1e-2  # the source training's own Adam learning rate; not tuned on target data


def source_as_is(model: torch.nn.Module, adapt_x: torch.Tensor, adapt_y: torch.Tensor,
                 test_x: torch.Tensor, *, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """The source network's softmax on the target test images; the labelled examples are ignored."""
    return predict_proba(model, test_x), {}


def last_layer_retraining(model: torch.nn.Module, adapt_x: torch.Tensor, adapt_y: torch.Tensor,
                          test_x: torch.Tensor, *, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Multinomial logistic regression on the frozen network's standardised penultimate features (a new last layer).

    The L2 strength is chosen from :data:`LAST_LAYER_CS` by stratified cross-validation of the log-loss on the
    labelled examples (min(labels per class, 5) folds); with one label per class there is nothing to hold out and
    scikit-learn's default C = 1 is used.
    """
    from sklearn.exceptions import ConvergenceWarning

    features = penultimate_features(model, adapt_x)
    labels = adapt_y.cpu().numpy()
    per_class = int(np.bincount(labels).min())
    with warnings.catch_warnings():
        # a tiny, separable training set makes lbfgs report slow convergence at weak L2; the held-out log-loss
        # still compares the candidates, which is all the search needs
        warnings.simplefilter("ignore", ConvergenceWarning)
        chosen = _cross_validated_c(features, labels, per_class, seed) if per_class >= 2 else 1.0
        clf = _logistic_regression(chosen).fit(features, labels)
    probs = clf.predict_proba(penultimate_features(model, test_x))
    return probs, {"C": chosen}


def _logistic_regression(c: float) -> Any:
    """Standardised features (statistics of the examples it is fitted on), then L2 multinomial logistic regression;
    standardising makes lbfgs converge in tens of iterations instead of thousands."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=5000))


def _cross_validated_c(features: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> float:
    """The C of :data:`LAST_LAYER_CS` with the lowest held-out log-loss over stratified folds (ties: the smaller C)."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    folds = list(StratifiedKFold(n_splits=min(per_class, 5), shuffle=True, random_state=seed).split(features, labels))
    classes = np.unique(labels)
    losses = []
    for c in LAST_LAYER_CS:
        loss = 0.0
        for train, held_out in folds:
            clf = _logistic_regression(c).fit(features[train], labels[train])
            loss += log_loss(labels[held_out], clf.predict_proba(features[held_out]), labels=classes)
        losses.append(loss)
    return float(LAST_LAYER_CS[int(np.argmin(losses))])


def full_fine_tuning(model: torch.nn.Module, adapt_x: torch.Tensor, adapt_y: torch.Tensor,
                     test_x: torch.Tensor, *, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Every parameter trained further by :data:`FINE_TUNE_STEPS` full-batch Adam steps (lr :data:`FINE_TUNE_LR`)."""
    tuned = fine_tune(model, adapt_x, adapt_y, steps=FINE_TUNE_STEPS, lr=FINE_TUNE_LR)
    return predict_proba(tuned, test_x), {"steps": FINE_TUNE_STEPS, "lr": FINE_TUNE_LR}
