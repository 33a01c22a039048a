"""params.yaml validation: bad input fails before any work, naming the dotted key."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))


def test_shipped_params_are_valid() -> None:
    cfg = load_params(ROOT / "params.yaml")

    assert len(cfg.class_names) >= 2
    assert cfg.crawl.classes[0].name == cfg.class_names[0]


def test_unknown_key_is_rejected_with_its_dotted_path(params: dict[str, Any]) -> None:
    params["train"]["baseline"]["epocs"] = 3

    with pytest.raises(ParamsError, match=r"train\.baseline\.epocs: unknown key"):
        parse_params(params)


def test_negative_epochs_is_rejected_with_value(params: dict[str, Any]) -> None:
    params["train"]["baseline"]["epochs"] = -1

    with pytest.raises(ParamsError, match=r"train\.baseline\.epochs: .*got -1"):
        parse_params(params)


def test_a_single_class_is_rejected(params: dict[str, Any]) -> None:
    params["classes"] = params["classes"][:1]

    with pytest.raises(ParamsError, match=r"classes: .*at least 2"):
        parse_params(params)


def test_class_without_a_source_is_rejected(params: dict[str, Any]) -> None:
    params["classes"][1] = {"name": params["classes"][1]["name"]}

    with pytest.raises(ParamsError, match=r"classes\.1"):
        parse_params(params)


def test_missing_classes_section_is_named(params: dict[str, Any]) -> None:
    del params["classes"]

    with pytest.raises(ParamsError, match=r"classes: Field required"):
        parse_params(params)


def test_duplicate_class_names_are_rejected(params: dict[str, Any]) -> None:
    params["classes"][1]["name"] = params["classes"][0]["name"]

    with pytest.raises(ParamsError, match="repeated"):
        parse_params(params)


def test_message_names_the_params_file(tmp_path: Path, params: dict[str, Any]) -> None:
    params["split"]["test"] = -0.5
    bad = tmp_path / "my-params.yaml"
    bad.write_text(yaml.safe_dump(params))

    with pytest.raises(ParamsError, match=r"my-params\.yaml.*\n.*split\.test"):
        load_params(bad)


def test_unparseable_yaml_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "params.yaml"
    bad.write_text("classes: [unclosed\n")

    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


@pytest.mark.parametrize("stage", ["crawl", "train-baseline", "evaluate"])
def test_cli_fails_fast_on_bad_params_naming_the_key(
    tmp_path: Path, params: dict[str, Any], stage: str
) -> None:
    params["train"]["baseline"]["epochs"] = -1
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", stage, "--params", str(bad)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 2
    assert "train.baseline.epochs" in result.stderr
    assert elapsed < 2.0, f"bad params took {elapsed:.2f}s to reject"
