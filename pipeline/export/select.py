"""Which trained model to ship: ``export.model`` (or ``serve.model``) resolved to files.

Consumes ``reports/metrics/models/<model>.json`` (evaluate's test-split metrics, one file per
model), ``models/<model>.keras`` with its sidecar ``models/<model>.json``, and for ``models/best``
the flow's promoted copy ``models/best/{model.keras,model.json,best.json}``. Produces a
``ChosenModel``: the files to load, the model's test metrics and a sentence saying why it was
chosen. Reads only; raises StageError naming the file or the params key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import StageError

BEST = "best"
PROMOTED = "models/best"


@dataclass(frozen=True)
class ChosenModel:
    """The model to export or serve: its name, files and test-split metrics."""

    name: str
    keras_path: Path
    sidecar_path: Path
    metrics: dict[str, Any]
    reason: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StageError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: unreadable: {exc}") from None
    if not isinstance(data, dict):
        raise StageError(f"{path}: expected a JSON object")
    return data


def _metric(metrics: dict[str, Any], metric: str, source: Path, key: str) -> float:
    value = metrics.get(metric)
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise StageError(f"{source}: no numeric {metric!r} ({key}.metric)")
    return float(value)


def scored_models(metrics_dir: Path, models_dir: Path) -> dict[str, dict[str, Any]]:
    """Every model with a metrics file and a .keras file, name → its metrics (sorted by name)."""
    return {
        path.stem: _read_json(path)
        for path in sorted(Path(metrics_dir).glob("*.json"))
        if (Path(models_dir) / f"{path.stem}.keras").is_file()
    }


def _best(
    metrics_dir: Path, models_dir: Path, metric: str, higher_is_better: bool, key: str
) -> ChosenModel:
    scored = scored_models(metrics_dir, models_dir)
    if not scored:
        raise StageError(
            f"{metrics_dir}: no model has both a metrics file here and a .keras file in "
            f"{models_dir} (run the train and evaluate stages, or set {key}.model to a name)"
        )
    values = {
        name: _metric(m, metric, metrics_dir / f"{name}.json", key) for name, m in scored.items()
    }
    sign = 1.0 if higher_is_better else -1.0
    name = max(values, key=lambda n: sign * values[n])  # ties: the first name in sorted order
    ranked = sorted(values.items(), key=lambda item: -sign * item[1])
    ranking = ", ".join(f"{n} {v:.4f}" for n, v in ranked)
    direction = "highest" if higher_is_better else "lowest"
    return ChosenModel(
        name,
        models_dir / f"{name}.keras",
        models_dir / f"{name}.json",
        scored[name],
        f"{direction} test {metric} ({ranking})",
    )


def _promoted(models_dir: Path, key: str) -> ChosenModel:
    best_dir = models_dir / "best"
    keras_path, sidecar = best_dir / "model.keras", best_dir / "model.json"
    if not keras_path.is_file():
        raise StageError(
            f"{keras_path}: not found ({key}.model is {PROMOTED!r}, but no flow run has promoted "
            "a model yet)"
        )
    record = _read_json(best_dir / "best.json")
    name = str(record.get("model", "best"))
    metric, value = record.get("metric"), record.get("value")
    metrics = {str(metric): value} if metric else {}
    return ChosenModel(
        name, keras_path, sidecar, metrics, f"promoted by the flow ({metric} {value})"
    )


def choose_model(
    choice: str,
    models_dir: Path,
    metrics_dir: Path,
    metric: str = "accuracy",
    higher_is_better: bool = True,
    key: str = "export",
) -> ChosenModel:
    """Resolve ``choice`` (``best``, ``models/best`` or a model name) to a ChosenModel.

    ``key`` is the params section named in messages (``export`` or ``serve``). Raises
    StageError naming the file when a model, its metrics or the promoted copy is missing.
    """
    models_dir, metrics_dir = Path(models_dir), Path(metrics_dir)
    if choice == BEST:
        return _best(metrics_dir, models_dir, metric, higher_is_better, key)
    if choice == PROMOTED:
        return _promoted(models_dir, key)
    keras_path = models_dir / f"{choice}.keras"
    if not keras_path.is_file():
        available = sorted(p.stem for p in models_dir.glob("*.keras"))
        raise StageError(
            f"{keras_path}: not found ({key}.model is {choice!r}; available: "
            f"{', '.join(available) or 'none'})"
        )
    metrics_path = metrics_dir / f"{choice}.json"
    metrics = _read_json(metrics_path) if metrics_path.is_file() else {}
    return ChosenModel(
        choice, keras_path, models_dir / f"{choice}.json", metrics, f"named by {key}.model"
    )
