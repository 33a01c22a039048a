"""The audit's reports: ``reports/audit_report.json`` and the ``reports/audit_suspects.png`` plot.

Consumes the ``verdicts.Finding`` of every image and the ``scoring.Scores`` behind them. Produces
the JSON report (counts per split and class, cleanlab's estimated noise rate per class, the
cross-validation's chosen regularisation and accuracy, every change with its reason, the test
split's suspect count for the model card) and a grid of each class's most suspect images, each
captioned "given → suggested".
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.audit.inputs import SPLITS
from pipeline.audit.scoring import Scores
from pipeline.audit.verdicts import CHANGES, Finding
from pipeline.config import AuditConfig
from pipeline.files import atomic_path, atomic_write_json


def _counts(findings: list[Finding]) -> dict[str, int]:
    verdicts = Counter(f.verdict for f in findings)
    return {
        "images": len(findings),
        "suspects": sum(f.suspect for f in findings),
        "label_issues": sum(f.label_issue for f in findings),
        "foreign": sum(f.foreign for f in findings),
        "flagged": verdicts["flag"],
        "dropped": verdicts["drop"] + verdicts["review:drop"],
        "relabelled": verdicts["relabel"] + verdicts["review:relabel"],
        "reviewed": sum(n for v, n in verdicts.items() if v.startswith("review:")),
    }


def _per_split_and_class(findings: list[Finding], class_names: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for split in SPLITS:
        in_split = [f for f in findings if f.image.split == split]
        table[split] = {
            "all": _counts(in_split),
            **{c: _counts([f for f in in_split if f.image.label == c]) for c in class_names},
        }
    return table


def _accuracy(findings: list[Finding], test: bool) -> float | None:
    rows = [f for f in findings if (f.image.split == "test") == test]
    if not rows:
        return None
    return round(sum(f.suggested == f.image.label for f in rows) / len(rows), 4)


def suspects_in_test(findings: list[Finding]) -> dict[str, Any]:
    """What the model card states: test images, how many are suspect and still in test.csv."""
    test = [f for f in findings if f.image.split == "test"]
    kept = [f for f in test if f.final_class is not None]
    suspects = [f for f in kept if f.verdict == "flag"]
    return {
        "images": len(kept),
        "suspects": len(suspects),
        "share": round(len(suspects) / len(kept), 4) if kept else 0.0,
        "reviewed": sum(f.verdict.startswith("review:") for f in test),
    }


def write_report(
    path: Path,
    findings: list[Finding],
    scores: Scores,
    class_names: list[str],
    cfg: AuditConfig,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """Write the JSON report to ``path``; returns it."""
    report = {
        "params": cfg.model_dump(mode="json"),
        "classes": class_names,
        **extra,
        "model": {
            "folds": scores.folds,
            "chosen_c": list(scores.chosen_c),
            "out_of_fold_accuracy": {
                "train+val": _accuracy(findings, test=False),
                "test": _accuracy(findings, test=True),
            },
        },
        "noise_rate": {
            pool: dict(zip(class_names, rates, strict=True))
            for pool, rates in scores.noise_rate.items()
        },
        "ood_score_quantiles": {
            q: round(float(np.quantile(scores.ood_score, float(q))), 3)
            for q in ("0.5", "0.9", "0.95", "0.99")
        },
        "totals": _counts(findings),
        "counts": _per_split_and_class(findings, class_names),
        "test_suspects": suspects_in_test(findings),
        "changes": [
            {
                "path": f.image.clean_path,
                "sha256": f.image.sha256,
                "split": f.image.split,
                "verdict": f.verdict,
                "class_given": f.image.label,
                "class_final": f.final_class,
                "reason": f.reason,
            }
            for f in findings
            if f.verdict in CHANGES
        ],
    }
    atomic_write_json(path, report)
    return report


def draw_suspects(
    path: Path, findings: list[Finding], class_names: list[str], per_class: int
) -> None:
    """Write the PNG: one row per given class, its most suspect images (lowest label quality
    first, foreign ones included), captioned "given → suggested" or "given → foreign"."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    rows = {
        c: sorted(
            (f for f in findings if f.suspect and f.image.label == c),
            key=lambda f: (f.label_quality, -f.ood_score),
        )[:per_class]
        for c in class_names
    }
    columns = max([1, *(len(r) for r in rows.values())])
    fig, axes = plt.subplots(
        len(class_names), columns, figsize=(1.6 * columns, 1.9 * len(class_names)), squeeze=False
    )
    for axis in axes.flat:
        axis.axis("off")
    for r, name in enumerate(class_names):
        axes[r, 0].set_title(f"{name}: no suspects" if not rows[name] else "", fontsize=8)
        for c, finding in enumerate(rows[name]):
            with Image.open(finding.image.file) as image:
                axes[r, c].imshow(np.asarray(image.convert("RGB")))
            target = "foreign" if finding.foreign and not finding.label_issue else finding.suggested
            axes[r, c].set_title(
                f"{name} → {target}\n{finding.image.split} q={finding.label_quality:.2f}",
                fontsize=7,
                color="firebrick" if finding.verdict in CHANGES else "black",
            )
    fig.suptitle("Most suspect images per given class (red: removed or relabelled)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
