"""Where each stage reads and writes, relative to the project root.

dvc.yaml names the same paths as each stage's deps and outs; keep the two in step.
"""

from __future__ import annotations

from pathlib import Path

RAW = Path("data/raw")  # crawl: <class>/<sha256>.<ext> + manifest.jsonl
CLEAN = Path("data/clean")  # clean: <class>/<sha256>.png + manifest, removed, groups
SPLIT = Path("data/split")  # split: train.csv, val.csv, test.csv (path, class, group)
AUGMENTED = Path("data/augmented")  # augment (offline mode): augmented copies + manifest.csv
FEATURES = Path("data/features")  # train-transfer: cached VGG16 features (*.npy)
MODELS = Path("models")  # train-*: *.keras
DVCLIVE = Path("dvclive")  # train-*: dvclive/<stage>/ metrics and training curves
REPORTS = Path("reports")  # *_report.json metrics, metrics.json, plots, model_card.md

CRAWL_REPORT = REPORTS / "crawl_report.json"
CLEAN_REPORT = REPORTS / "clean_report.json"
SPLIT_REPORT = REPORTS / "split_report.json"
AUGMENT_PREVIEW = REPORTS / "augment_preview.png"
METRICS = REPORTS / "metrics.json"
