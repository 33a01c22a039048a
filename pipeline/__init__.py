"""crawl2model: crawl → clean → split → augment → train-baseline → train-transfer → evaluate.

Each stage is one module with one public function over a typed config; the CLI
(``python -m pipeline <stage>``), dvc.yaml and the Prefect flow are thin callers of it.
"""

__version__ = "0.1.0"
