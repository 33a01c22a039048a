"""params.yaml validation: bad input fails before any work, naming the dotted key."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from pipeline.config import Params, ParamsError, load_params, parse_params

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


# --------------------------------------------------------------------------------------------
# Typed at every depth: a typo anywhere fails, naming the dotted key


@pytest.mark.parametrize(
    ("where", "key"),
    [
        (("crawl",), "max_imges_per_class"),
        (("clean",), "near_dup_max_distanse"),
        (("split",), "tets"),
        (("augment",), "rotation_range"),  # belongs under augment.transforms
        (("augment", "transforms"), "rotaton_range"),
        (("augment", "preview"), "preview_images"),
        (("train",), "image_size"),  # belongs under train.fit
        (("train", "fit"), "batch_sise"),
        (("train", "baseline"), "learning_rte"),
        (("train", "transfer"), "weigths"),
        (("evaluate",), "model"),
        (("flow",), "cronn"),
        (("flow", "promote"), "metrc"),
        (("train", "compare"), "backbon"),
        (("audit",), "acton"),
        (("export",), "modle"),
        (("serve",), "max_upload"),
    ],
)
def test_a_typo_in_any_section_is_rejected_naming_the_dotted_key(
    params: dict[str, Any], where: tuple[str, ...], key: str
) -> None:
    node = params
    for part in where:
        node = node.setdefault(part, {})
    node[key] = 1
    dotted = ".".join((*where, key)).replace(".", r"\.")

    with pytest.raises(ParamsError, match=rf"{dotted}: unknown key"):
        parse_params(params)


def test_a_typo_inside_a_class_is_rejected(params: dict[str, Any]) -> None:
    params["classes"][0]["seed"] = ["http://example.org/"]

    with pytest.raises(ParamsError, match=r"classes\.0\.seed: unknown key"):
        parse_params(params)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("train", "seed", 1),
        ("augment", "seed", 1),
        ("evaluate", "image_size", 128),
        ("crawl", "classes", []),
        ("train", "augment", {"transforms": {"rotation_range": 90}}),
    ],
)
def test_values_the_code_injects_cannot_be_set_in_a_section(
    params: dict[str, Any], section: str, key: str, value: Any
) -> None:
    params[section][key] = value

    with pytest.raises(ParamsError, match=rf"{section}\.{key}: unknown key"):
        parse_params(params)


def test_injected_values_come_from_their_one_place(params: dict[str, Any]) -> None:
    params["seed"] = 7
    params["train"]["fit"]["image_size"] = 96

    cfg = parse_params(params)

    assert (cfg.train.seed, cfg.augment.seed, cfg.train.augment.seed, cfg.split.seed) == (7,) * 4
    assert cfg.evaluate.image_size == 96
    assert [c.name for c in cfg.crawl.classes] == cfg.class_names


# Every section params.yaml spells out in full (split's seed is optional: it defaults to the
# global one), so a new section is covered here without an edit.
SECTIONS = tuple(name for name in Params.model_fields if name not in ("seed", "classes", "split"))

# The shipped params.yaml runs the bundled demo; these keys differ from the defaults on purpose,
# and each says so on its line in params.yaml ("demo value"). Any other difference is drift.
DEMO_VALUES = {
    "crawl.serve_demo_site",
    "crawl.user_agent",
    "crawl.allow_private_addresses",
    "crawl.max_images_per_class",
    "crawl.max_per_host",
    "train.transfer.fine_tune_epochs",
    # the demo's transfer model: real ImageNet MobileNetV2 weights that ship offline
    "train.transfer.backbone",
    "train.transfer.weights",
    "train.transfer.image_size",
    "train.transfer.unfreeze",
    "train.transfer.fine_tune_lr",
    "train.compare.fine_tune_epochs",
}


def _leaves(model: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, default) for every leaf field of a params section model."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value, field.get_default(call_default_factory=True)


def test_params_yaml_and_the_config_defaults_do_not_drift() -> None:
    shipped = Params.model_validate(yaml.safe_load((ROOT / "params.yaml").read_text()))
    sections = {name: getattr(shipped, name) for name in SECTIONS}

    differing = {
        f"{section}.{key}"
        for section, model in sections.items()
        for key, value, default in _leaves(model)
        if value != default
    }

    assert differing == DEMO_VALUES
    text = (ROOT / "params.yaml").read_text()
    lines = text.splitlines()
    for dotted in DEMO_VALUES:
        at = -1  # walk down the dotted path: train.transfer.image_size is not train.fit's
        for part in dotted.split("."):
            at = next(
                i for i, line in enumerate(lines) if i > at and line.strip().startswith(part + ":")
            )
        said = " ".join(lines[at - 1 : at + 2])  # the key's line and the comment lines beside it
        assert "demo value" in said, f"params.yaml: say why {dotted} differs from its default"


def test_params_yaml_spells_out_every_key_of_every_section() -> None:
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    shipped = Params.model_validate(data)

    def missing(model: Any, given: dict[str, Any], prefix: str) -> Iterator[str]:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if name not in given:
                yield prefix + name
            elif isinstance(value, BaseModel):
                yield from missing(value, given[name], f"{prefix}{name}.")

    absent = [
        key
        for section in SECTIONS
        for key in missing(getattr(shipped, section), data[section], f"{section}.")
    ]

    assert absent == []
