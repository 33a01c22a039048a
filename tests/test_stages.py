"""The stage registry (pipeline/stages.py), the CLI, the flow and dvc.yaml agree on the stages."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from flows import pipeline_flow
from pipeline import stages
from pipeline.__main__ import build_parser

ROOT = Path(__file__).resolve().parents[1]
DVC_STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
# CLI wiring: which stage runs and where it writes is declared in dvc.yaml itself.
WIRING = {"pipeline", "pipeline.__main__", "pipeline.stages", "pipeline.paths"}


def _declared_paths(entries: list[str | dict[str, object]]) -> set[str]:
    return {entry if isinstance(entry, str) else next(iter(entry)) for entry in entries}


def _module_file(module: str) -> Path:
    base = ROOT / Path(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _imported_modules(module: str) -> set[str]:
    """Every ``pipeline`` module ``module`` imports, transitively, including imports inside
    functions (stages import heavy modules lazily)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        tree = ast.parse(path.read_text(), filename=str(path))
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        if path.name == "__init__.py":  # a package's modules are all part of it
            todo += [f"{name}.{p.stem}" for p in path.parent.glob("*.py") if p.stem != "__init__"]
            todo += [
                f"{name}.{p.name}" for p in path.parent.iterdir() if (p / "__init__.py").exists()
            ]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                if target == "pipeline" or target.startswith("pipeline."):
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        todo.append(sub if _module_file(sub).exists() else target)
            elif isinstance(node, ast.Import):
                todo += [a.name for a in node.names if a.name.startswith("pipeline")]
    return {m for m in seen if _module_file(m).exists()} - WIRING


def test_dvc_yaml_has_the_registry_stages_in_order() -> None:
    assert tuple(DVC_STAGES) == stages.NAMES


def test_cli_offers_every_registry_stage() -> None:
    parser = build_parser()
    choices = next(a for a in parser._actions if a.dest == "stage").choices

    assert set(stages.NAMES) <= set(choices)
    assert set(choices) - set(stages.NAMES) == {"check", "predict", "serve"}


def test_flow_runs_the_registry_stages() -> None:
    assert pipeline_flow.STAGES == stages.NAMES


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_dvc_stage_runs_the_cli_with_the_registry_params(stage: stages.Stage) -> None:
    declared = DVC_STAGES[stage.name]

    assert declared["cmd"] == f"python -m pipeline {stage.name}"
    assert tuple(declared["params"]) == stage.params


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_dvc_stage_declares_every_output_the_registry_lists(stage: stages.Stage) -> None:
    declared = DVC_STAGES[stage.name]
    written = {
        *map(str, stage.outputs),
        str(stage.summary_path),
        *([str(stage.metrics_path)] if stage.metrics_path else []),
    }

    listed = set()
    for kind in ("outs", "metrics", "plots"):
        listed |= _declared_paths(declared.get(kind, []))
    assert listed == written


@pytest.mark.parametrize("stage", stages.STAGES, ids=lambda s: s.name)
def test_dvc_stage_depends_on_every_module_its_code_imports(stage: stages.Stage) -> None:
    deps = _declared_paths(DVC_STAGES[stage.name]["deps"])

    uncovered = [
        module
        for module in sorted(_imported_modules(stage.module))
        if not any(
            _module_file(module).relative_to(ROOT).as_posix().startswith(dep.rstrip("/") + "/")
            or _module_file(module).relative_to(ROOT).as_posix() == dep
            for dep in deps
        )
    ]

    assert uncovered == [], f"dvc.yaml: stage {stage.name} should depend on {uncovered}"


def test_params_groups_cover_only_keys_that_exist() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for stage in stages.STAGES:
        for group in stage.params:
            node = params
            for part in group.split("."):
                assert isinstance(node, dict) and part in node, f"{stage.name}: no {group}"
                node = node[part]


def test_changing_a_preview_knob_reruns_only_augment() -> None:
    affected = [
        s.name
        for s in stages.STAGES
        if any("augment.preview.images".startswith(group) for group in s.params)
    ]

    assert affected == ["augment"]


def test_run_stage_writes_the_summary_file_the_flow_reads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Summary:
        kept: int
        removed: dict[str, int]

        def __str__(self) -> str:
            return f"kept {self.kept}"

    fake = stages.Stage(
        "clean",
        "",
        "pipeline.clean",
        (),
        (),
        lambda cfg, opts: Summary(3, {"too_small": 2}),
        lambda s: {"images": s.kept, "dropped": sum(s.removed.values())},
    )
    monkeypatch.setitem(stages.BY_NAME, "clean", fake)
    monkeypatch.chdir(tmp_path)

    stages.run_stage("clean", None)  # type: ignore[arg-type]

    written = json.loads((tmp_path / "reports/summaries/clean.json").read_text())
    assert written["summary"] == "kept 3"
    assert written["fields"] == {"kept": 3, "removed": {"too_small": 2}}
    assert stages.read_summary(tmp_path, "clean") == "kept 3"
    metrics = json.loads((tmp_path / "reports/metrics/clean.json").read_text())
    assert metrics == {"images": 3, "dropped": 2}
