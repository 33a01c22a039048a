"""Export stage (``python -m pipeline export``): one trained model in formats a client can run.

Consumes ``reports/metrics/models/*.json``, ``models/<model>.keras`` + sidecar (or
``models/best/``) and ``data/split/val.csv``; produces ``models/export/`` (SavedModel with an
image-bytes signature, TFLite float32/float16/int8, ONNX, labels.txt, model.json). Modules:

- ``select``: which model ``export.model`` names (best on the test split, a name, models/best);
- ``formats``: one writer per format;
- ``runtimes``: run each format as a client would (the parity check, tests, bench/export.py);
- ``stage``: the stage itself, ``export(cfg, split_dir, models_dir, metrics_dir, out_dir)``.
"""

from pipeline.export.stage import ExportSummary, describe_model, export

__all__ = ["ExportSummary", "describe_model", "export"]
