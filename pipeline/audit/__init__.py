"""Label audit: find the crawled images whose label is wrong, or that belong to no class.

Consumes the split (data/split), the clean images and manifest (data/clean) and a person's review
file; produces the audited split CSVs the trainers and evaluate read (data/audit/), the issue
table, a JSON report and a plot of each class's most suspect images. See ``stage.py``.

Modules, one concern each: ``inputs`` (split rows joined to the manifest, the review file),
``features`` (the per-image backbone feature cache), ``scoring`` (out-of-fold probabilities,
cleanlab's label issues, foreign-image scores), ``verdicts`` (what happens to each image, the
audited CSVs), ``report`` (JSON and plot), ``stage`` (the entry point).
"""

from pipeline.audit.stage import AuditSummary, audit
from pipeline.audit.verdicts import suspect_test_paths

__all__ = ["AuditSummary", "audit", "suspect_test_paths"]
