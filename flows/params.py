"""Flow parameters: the params file plus dotted-key overrides, validated before any work.

Kept free of Prefect imports so a bad parameter fails in about a second.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from pipeline.config import DEFAULT_PARAMS, ParamsError, StageConfigs, parse_params


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """``set_dotted(d, "train.baseline.epochs", 2)`` sets ``d["train"]["baseline"]["epochs"]``."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ParamsError(f"overrides: {key}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def resolve_params(
    params_file: Path, overrides: dict[str, Any] | None = None
) -> tuple[dict[str, Any], StageConfigs]:
    """Read ``params_file``, apply dotted-key ``overrides`` and validate the result.

    Returns the raw mapping and its StageConfigs. Raises ParamsError naming the file and key.
    """
    try:
        data = yaml.safe_load(Path(params_file).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"{params_file}: params file not found") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{params_file}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ParamsError(f"{params_file}: expected a mapping at the top level")
    data = copy.deepcopy(data)
    for key, value in (overrides or {}).items():
        set_dotted(data, key, value)
    source = f"{params_file} with overrides" if overrides else str(params_file)
    return data, parse_params(data, source=source)


def write_params(root: Path, params_file: Path, overrides: dict[str, Any] | None) -> StageConfigs:
    """Make ``<root>/params.yaml`` (the file DVC reads) say what this run was asked to use.

    A different ``params_file`` replaces it; overrides are written into it like ``dvc exp run
    -S`` does, keeping its comments. Validates first, so bad params change nothing.
    """
    from dvc.utils.serialize import modify_yaml

    from pipeline.files import atomic_write_text

    target = root / DEFAULT_PARAMS
    _, cfg = resolve_params(params_file, overrides)
    if Path(params_file).resolve() != target.resolve():
        atomic_write_text(target, Path(params_file).read_text(encoding="utf-8"))
    if overrides:
        with modify_yaml(str(target)) as data:
            for key, value in overrides.items():
                set_dotted(data, key, value)
    return cfg
