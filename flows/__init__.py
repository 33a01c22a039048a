"""Prefect 3 orchestration for crawl2model: the pipeline as a scheduled, observable flow.

``flows/pipeline_flow.py`` holds the flow (``crawl2model``), ``flows/versioning.py`` the DVC/git
calls it makes, ``flows/promote.py`` the models/best/ promotion rule, and ``python -m flows``
the command line (``run`` once, or ``serve`` on a cron schedule). The stages themselves live in
``pipeline/``; nothing here recomputes what a stage computes or what DVC decides.
"""
