"""The audit stage: find the crawled images whose label is wrong, or that belong to no class.

Consumes ``data/split/{train,val,test}.csv``, ``data/clean`` (images and manifest), the review
file (``audit.review``, a person's decisions; missing = none) and params ``audit``, ``seed`` and
``train.transfer``'s backbone, weights and input size. Produces, in ``data/audit/``:

- ``train.csv``, ``val.csv``, ``test.csv``: what the trainers and evaluate read; the split's CSVs
  with the audit's and the review's changes (with ``action: flag`` and no review, identical);
- ``label_issues.csv``: each suspect or reviewed image with its given and suggested class, label
  quality, foreign score, verdict and reason (``verdicts.ISSUE_COLUMNS``), most suspect first;
- ``features/``: the per-image feature cache (``features.py``);

and ``reports/audit_report.json`` and ``reports/audit_suspects.png`` (``report.py``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.audit.features import POOLED_LAYERS, image_features
from pipeline.audit.inputs import read_images, read_review, read_split_tables
from pipeline.audit.report import draw_suspects, write_report
from pipeline.audit.scoring import score
from pipeline.audit.verdicts import decide, write_audited_splits, write_issue_table
from pipeline.config import AuditConfig, StageError

ISSUES_CSV = "label_issues.csv"
FEATURES_DIR = "features"


@dataclass(frozen=True)
class AuditSummary:
    images: int
    suspects: int
    label_issues: int
    foreign: int
    test_suspects: int
    dropped: int
    relabelled: int
    reviewed: int
    action: str
    extracted: int
    out_of_fold_accuracy: float
    seconds: float
    report: Path

    def __str__(self) -> str:
        return (
            f"{self.images} images audited ({self.extracted} new features): {self.suspects} "
            f"suspects ({self.label_issues} label issues, {self.foreign} foreign), "
            f"{self.test_suspects} of them in test; action {self.action}: {self.dropped} "
            f"dropped, {self.relabelled} relabelled, {self.reviewed} reviewed; out-of-fold "
            f"accuracy {self.out_of_fold_accuracy:.3f}; report {self.report}"
        )


def audit(
    cfg: AuditConfig,
    split_dir: Path,
    clean_dir: Path,
    out: Path,
    report: Path,
    suspects_plot: Path,
) -> AuditSummary:
    """Audit every image in the split; write the audited CSVs, the issue table and reports.

    Returns an AuditSummary. Raises StageError naming the file (and line) of a missing split or
    manifest, a bad review row, or a class too small to cross-validate.
    """
    started = time.monotonic()
    tables = read_split_tables(split_dir)
    images = read_images(tables, clean_dir)
    class_names = sorted({image.label for image in images})
    if len(class_names) < 2:
        raise StageError(f"{split_dir}: the audit needs at least 2 classes, found {class_names}")
    review = read_review(cfg.review, images, class_names, out, clean_dir)

    features, extracted = image_features(
        [i.file for i in images], [i.sha256 for i in images], cfg, out / FEATURES_DIR
    )
    labels = np.array([class_names.index(i.label) for i in images])
    is_test = np.array([i.split == "test" for i in images])
    scores = score(features, labels, [i.group for i in images], is_test, class_names, cfg)
    findings = decide(images, scores, class_names, review, cfg)

    write_audited_splits(tables, findings, out)
    write_issue_table(findings, out, out / ISSUES_CSV)
    features_info = {
        "backbone": cfg.backbone,
        "weights": cfg.weights,
        "image_size": cfg.image_size,
        "layers": list(POOLED_LAYERS.get(cfg.backbone, ("last",))),
        "dimensions": int(features.shape[1]),
        "extracted": extracted,
    }
    body = write_report(report, findings, scores, class_names, cfg, {"features": features_info})
    draw_suspects(suspects_plot, findings, class_names, cfg.suspects_per_class)
    totals = body["totals"]
    return AuditSummary(
        images=len(images),
        suspects=totals["suspects"],
        label_issues=totals["label_issues"],
        foreign=totals["foreign"],
        test_suspects=body["test_suspects"]["suspects"],
        dropped=totals["dropped"],
        relabelled=totals["relabelled"],
        reviewed=totals["reviewed"],
        action=cfg.action,
        extracted=extracted,
        out_of_fold_accuracy=body["model"]["out_of_fold_accuracy"]["train+val"] or 0.0,
        seconds=round(time.monotonic() - started, 1),
        report=report,
    )
