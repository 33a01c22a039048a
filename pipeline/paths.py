"""Where each stage reads and writes, relative to the project root.

dvc.yaml names the same paths as each stage's deps and outs; tests/test_stages.py checks that
the two (and pipeline/stages.py) agree.
"""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")  # crawl: <class>/<sha256>.<ext> + manifest.jsonl
CLEAN = Path("data/clean")  # clean: <class>/<sha256>.<jpg|png> + manifest, removed, groups
SPLIT = Path("data/split")  # split: train.csv, val.csv, test.csv (path, class, group)
AUDIT = Path("data/audit")  # audit: the audited train/val/test.csv (what training reads),
# label_issues.csv, features/ (cache); review.csv, a person's decisions, is an input (git)
AUGMENTED = Path("data/augmented")  # augment (offline mode): augmented copies + manifest.csv
FEATURES = Path("data/features")  # train-transfer: cached VGG16 features (*.npy)
MODELS = Path("models")  # train-*: *.keras + <model>.json sidecars
EXPORT = MODELS / "export"  # export: SavedModel, TFLite, ONNX, labels.txt, model.json
BEST_MODEL = MODELS / "best"  # the flow's promoted model: model.keras, model.json, best.json
DVCLIVE = Path("dvclive")  # train-*: dvclive/<stage>/ training curves
REPORTS = Path("reports")  # reports, plots, model card; metrics under reports/metrics/

CRAWL_REPORT = REPORTS / "crawl_report.json"
CLEAN_REPORT = REPORTS / "clean_report.json"
CLEAN_DUPLICATES = REPORTS / "clean_duplicates.png"
SPLIT_REPORT = REPORTS / "split_report.json"
AUDIT_REPORT = REPORTS / "audit_report.json"
AUDIT_SUSPECTS = REPORTS / "audit_suspects.png"
AUGMENT_PREVIEW = REPORTS / "augment_preview.png"
SUMMARIES = REPORTS / "summaries"  # <stage>.json: each stage's one-line summary and its fields
STAGE_METRICS = REPORTS / "metrics"  # <stage>.json: a few headline counts (DVC metrics)
MODEL_METRICS = STAGE_METRICS / "models"  # <model>.json: accuracy, macro F1, log loss, ROC AUC
EVALUATION = REPORTS / "evaluation.json"  # per-class and per-model detail (not a DVC metric)
PREDICTIONS = REPORTS / "predictions"
ROC = REPORTS / "roc"
PR = REPORTS / "pr"
MODEL_CARD = REPORTS / "model_card.md"
MISCLASSIFIED = REPORTS / "misclassified"
