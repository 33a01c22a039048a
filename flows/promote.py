"""Promotion: copy a run's model into ``models/best/`` only when it is not worse than the best.

Consumes ``reports/metrics/models/<model>.json`` (evaluate's headline metrics for one model),
``models/<model>.keras`` and its
sidecar ``models/<model>.json``, and the rule in params.yaml's ``flow.promote``. Produces
``models/best/`` holding ``model.keras``, ``model.json`` (the sidecar, unchanged) and
``best.json`` (which model, the metric and its value, when, from which run). The folder is
replaced as a whole, so a kill leaves either the old best or the new one, never a mix.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import PromotionConfig, StageError
from pipeline.files import atomic_write_json

BEST_RECORD = "best.json"


@dataclass(frozen=True)
class Promotion:
    """What the promotion step decided; ``str()`` is the line the flow logs."""

    promoted: bool
    model: str
    metric: str
    value: float
    best_value: float | None
    reason: str

    def __str__(self) -> str:
        verdict = "promoted to models/best" if self.promoted else "kept the current models/best"
        return f"{verdict}: {self.reason}"


def metric_value(metrics: dict[str, Any], model: str, metric: str, source: Path) -> float:
    """Return ``metrics[metric]`` (one model's metrics), where ``metric`` may be dotted.

    Raises StageError naming the file and the missing key.
    """
    node: Any = metrics
    for part in metric.split("."):
        if not isinstance(node, dict) or part not in node:
            raise StageError(f"{source}: {model}.{metric} not found (flow.promote.metric)")
        node = node[part]
    if not isinstance(node, int | float) or isinstance(node, bool):
        raise StageError(f"{source}: {model}.{metric} is not a number (flow.promote.metric)")
    return float(node)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _replace_dir(staged: Path, target: Path) -> None:
    """Swap ``staged`` into ``target`` with renames, so readers see the old or the new folder."""
    old = target.with_name(f".{target.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(staged, target)
    if old.exists():
        shutil.rmtree(old)


def _read_metrics(metrics_dir: Path, model: str) -> tuple[dict[str, Any], Path]:
    path = metrics_dir / f"{model}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")), path
    except FileNotFoundError:
        scored = sorted(p.stem for p in metrics_dir.glob("*.json"))
        raise StageError(
            f"{path}: not found: no metrics for model {model!r} (flow.promote.model); "
            f"models with metrics: {', '.join(scored) or 'none (run the evaluate stage first)'}"
        ) from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON: {exc}") from None


def _compare(
    rule: PromotionConfig, value: float, best_dir: Path, model_file: Path
) -> tuple[str | None, float | None, str]:
    """Against the current best: (why not to promote or None, the best's value, the reason)."""
    label = f"{rule.model} {rule.metric} {value:.4f}"
    best_record = best_dir / BEST_RECORD
    best: dict[str, Any] | None = None
    if best_record.exists():
        best = json.loads(best_record.read_text(encoding="utf-8"))
    if best is None or best.get("metric") != rule.metric:
        return None, None, f"{label}; no earlier best with this metric"
    best_value = float(best["value"])
    if best.get("sha256") == _sha256(model_file):
        return f"{label} is already the best (same model file)", best_value, ""
    drop = best_value - value if rule.higher_is_better else value - best_value
    if drop > rule.max_drop:
        refusal = (
            f"{label} is worse than the best {best_value:.4f} by {drop:.4f} "
            f"(flow.promote.max_drop allows {rule.max_drop:g})"
        )
        return refusal, best_value, ""
    return None, best_value, f"{label} vs best {best_value:.4f} (allowed drop {rule.max_drop:g})"


def _install(model_file: Path, sidecar: Path, best_dir: Path, record: dict[str, Any]) -> None:
    """Stage model, sidecar and record in a temp folder, then swap it in as ``best_dir``."""
    best_dir.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{best_dir.name}.", dir=best_dir.parent))
    try:
        shutil.copy2(model_file, staged / "model.keras")
        shutil.copy2(sidecar, staged / "model.json")
        atomic_write_json(staged / BEST_RECORD, record)
        _replace_dir(staged, best_dir)
    finally:
        if staged.exists():
            shutil.rmtree(staged)


def promote(
    rule: PromotionConfig,
    metrics_dir: Path,
    models_dir: Path,
    best_dir: Path,
    run_name: str = "",
) -> Promotion:
    """Copy ``models/<rule.model>`` into ``best_dir`` unless it is worse than the current best.

    "Worse" means the metric dropped by more than ``rule.max_drop`` (rose, when lower is better).
    The first run always promotes. A model identical to the current best (same bytes) is left
    alone. Returns a Promotion; raises StageError naming the file or params key when the metrics
    or the model file are missing.
    """
    models_dir, best_dir = Path(models_dir), Path(best_dir)
    metrics, metrics_path = _read_metrics(Path(metrics_dir), rule.model)
    value = metric_value(metrics, rule.model, rule.metric, metrics_path)
    model_file = models_dir / f"{rule.model}.keras"
    sidecar = models_dir / f"{rule.model}.json"
    for path in (model_file, sidecar):
        if not path.exists():
            raise StageError(f"{path}: not found (flow.promote.model is {rule.model!r})")
    refusal, best_value, reason = _compare(rule, value, best_dir, model_file)
    if refusal is not None:
        return Promotion(False, rule.model, rule.metric, value, best_value, refusal)
    record = {
        "model": rule.model,
        "metric": rule.metric,
        "value": value,
        "higher_is_better": rule.higher_is_better,
        "sha256": _sha256(model_file),
        "run": run_name,
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "previous_value": best_value,
    }
    _install(model_file, sidecar, best_dir, record)
    return Promotion(True, rule.model, rule.metric, value, best_value, reason)
