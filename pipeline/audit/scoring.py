"""Out-of-sample class probabilities, cleanlab's label issues and out-of-distribution scores.

Consumes one feature vector per image (``features.image_features``), the crawl's labels as class
indices, each image's near-duplicate group and which images are in the test split. Produces a
``Scores``: for every image, class probabilities from a model that never saw it, cleanlab's
label-quality score and label-issue flag, and an out-of-distribution score.

The cheap model is a logistic regression on standardised (and PCA-reduced) features, its
regularisation ``C`` chosen by an inner cross-validation on log loss: too weak a penalty
memorises the wrong labels, which then look right. It is cross-validated over train + val, folds
grouped by near-duplicate group so a copy never vouches for its twin. Test images are scored by
the average of the fold models, none of which saw a test label: the test split never influences
which train or val image is dropped, and its own suspects are found within it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.config import AuditConfig, StageError

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline


@dataclass(frozen=True)
class Scores:
    """Per image (rows in the order given): what the audit measured."""

    pred_probs: np.ndarray  # [n, classes] out-of-sample probabilities
    label_quality: np.ndarray  # [n] cleanlab's label quality (rank_by): low = suspect
    label_issue: np.ndarray  # [n] bool: cleanlab's find_label_issues
    ood_score: np.ndarray  # [n] robust z-score of the mean distance to the k nearest images
    foreign: np.ndarray  # [n] bool: ood_score above audit.ood_threshold
    chosen_c: tuple[float, ...]  # the C the inner CV chose, per outer fold
    folds: int
    # per pool ("train+val", "test"): given class → cleanlab's estimated share of wrong labels
    noise_rate: dict[str, list[float]]


def _classifier(cfg: AuditConfig, inner_folds: int, n_rows: int, n_features: int) -> Pipeline:
    """Standardise → PCA (``audit.components``) → logistic regression with C picked by an inner
    stratified CV on log loss."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    steps: list[object] = [StandardScaler()]
    components = min(cfg.components, n_rows - 1, n_features)
    if cfg.components and components >= 2:
        steps.append(PCA(components, random_state=cfg.seed))
    inner = StratifiedKFold(inner_folds, shuffle=True, random_state=cfg.seed)
    steps.append(
        LogisticRegressionCV(Cs=cfg.c_grid, cv=inner, scoring="neg_log_loss", max_iter=1000)
    )
    return make_pipeline(*steps)


def _fold_count(labels: np.ndarray, n_classes: int, wanted: int, class_names: list[str]) -> int:
    counts = np.bincount(labels, minlength=n_classes)
    smallest = int(counts.argmin())
    if counts[smallest] < 2:
        raise StageError(
            f"audit: class {class_names[smallest]!r} has {counts[smallest]} train/val image(s); "
            "cross-validation needs at least 2 per class"
        )
    return min(wanted, int(counts[smallest]))


def out_of_fold_probs(
    features: np.ndarray,
    labels: np.ndarray,
    groups: list[str],
    is_test: np.ndarray,
    class_names: list[str],
    cfg: AuditConfig,
) -> tuple[np.ndarray, tuple[float, ...], int]:
    """Class probabilities for every row from models that never saw it.

    Returns ``(probs [n, classes], C chosen per fold, folds used)``. Raises StageError when a
    class has fewer than 2 train/val images.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import StratifiedGroupKFold

    n_classes = len(class_names)
    pool = np.flatnonzero(~is_test)
    test = np.flatnonzero(is_test)
    folds = _fold_count(labels[pool], n_classes, cfg.folds, class_names)
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=cfg.seed)
    group_ids = np.array([g or f"row{i}" for i, g in enumerate(groups)])[pool]
    probs = np.zeros((len(labels), n_classes))
    chosen = []
    for fit_rows, held_rows in splitter.split(features[pool], labels[pool], group_ids):
        fit, held = pool[fit_rows], pool[held_rows]
        inner = _fold_count(labels[fit], n_classes, cfg.inner_folds, class_names)
        model = _classifier(cfg, inner, len(fit), features.shape[1])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            # sklearn 1.9 announces new defaults (l1_ratios, attributes) that do not change an
            # L2 fit; spelling them out would need 1.9 (pyproject allows ≥ 1.4)
            warnings.simplefilter("ignore", FutureWarning)
            model.fit(features[fit], labels[fit])
        columns = model[-1].classes_
        probs[np.ix_(held, columns)] = model.predict_proba(features[held])
        if len(test):
            probs[np.ix_(test, columns)] += model.predict_proba(features[test]) / folds
        chosen.append(float(np.ravel(model[-1].C_)[0]))
    return probs, tuple(chosen), folds


def _issues(labels: np.ndarray, probs: np.ndarray, cfg: AuditConfig) -> tuple[np.ndarray, ...]:
    """(label issue flags, label quality, noise rate per given class) within one pool."""
    from cleanlab.count import estimate_joint
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    flags = np.zeros(len(labels), dtype=bool)
    if len(labels) == 0:
        return flags, np.zeros(0), np.zeros(probs.shape[1])
    flags[find_label_issues(labels, probs, return_indices_ranked_by=cfg.rank_by)] = True
    quality = get_label_quality_scores(labels, probs, method=cfg.rank_by)
    joint = estimate_joint(labels, probs)
    given = joint.sum(axis=1)
    noise = 1 - np.divide(np.diag(joint), given, out=np.ones_like(given), where=given > 0)
    return flags, quality, noise


def ood_scores(features: np.ndarray, cfg: AuditConfig) -> np.ndarray:
    """How foreign each image looks: cleanlab's OutOfDistribution on the features (mean cosine
    distance to the k nearest images), as a robust z-score: how many (MAD-estimated) standard
    deviations farther from its neighbours than the median image. A z-score, not the distance,
    so one threshold fits every backbone (their distance scales differ several-fold).

    k (``audit.ood_neighbours``) must exceed any cluster of foreign images (a site's logos repeat)
    or they vouch for each other."""
    from cleanlab.outlier import OutOfDistribution

    k = min(cfg.ood_neighbours, len(features) - 1)
    if k < 1:
        return np.zeros(len(features))
    ood = OutOfDistribution(params={"k": k, "t": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = ood.fit_score(features=features, verbose=False)
    distance = -np.log(np.clip(scores, 1e-300, 1.0))  # mean k-NN distance over the median one
    median = np.median(distance)
    spread = 1.4826 * np.median(np.abs(distance - median))
    return (distance - median) / max(float(spread), 1e-12)


def score(
    features: np.ndarray,
    labels: np.ndarray,
    groups: list[str],
    is_test: np.ndarray,
    class_names: list[str],
    cfg: AuditConfig,
) -> Scores:
    """Everything the audit measures, per image. Raises StageError (see out_of_fold_probs)."""
    probs, chosen, folds = out_of_fold_probs(features, labels, groups, is_test, class_names, cfg)
    issue = np.zeros(len(labels), dtype=bool)
    quality = np.ones(len(labels))
    noise: dict[str, list[float]] = {}
    for name, rows in (("train+val", ~is_test), ("test", is_test)):
        index = np.flatnonzero(rows)
        flags, pool_quality, pool_noise = _issues(labels[index], probs[index], cfg)
        issue[index], quality[index] = flags, pool_quality
        noise[name] = [round(float(x), 4) for x in pool_noise]
    ood = ood_scores(features, cfg)
    return Scores(probs, quality, issue, ood, ood > cfg.ood_threshold, chosen, folds, noise)
