"""The web app (``python -m pipeline serve``): try the model and review the label audit.

Consumes a trained model (``serve.model``: best on the test split, a name, or models/best), the
audit's ``data/audit/label_issues.csv`` and ``data/clean/manifest.jsonl``; writes only the review
CSV (``serve.review_csv``). Modules:

- ``classifier``: upload bytes → checked, decoded pixels → probabilities (training's decode);
- ``uploads``: reading a request's images within the size and count limits;
- ``review``: flagged images and the review CSV;
- ``app``: the FastAPI routes and ``serve``; ``static/``: the two pages and their scripts.
"""

from pipeline.serve.app import create_app, serve
from pipeline.serve.classifier import Classifier, ImageRejected, load_classifier
from pipeline.serve.review import ReviewStore

__all__ = [
    "Classifier",
    "ImageRejected",
    "ReviewStore",
    "create_app",
    "load_classifier",
    "serve",
]
