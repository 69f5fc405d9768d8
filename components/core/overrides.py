"""Settings changed for one run: the `--set section.key=value` flag, typed overrides, writing them to params.yaml.

The strings are what `dvc exp run -S` takes; the typed form (`ParamsOverrides`) is what a Prefect run
form shows. Either way the whole result is validated against params.yaml's rules (components/core/config.py)
before anything runs or is written.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from components.core.config import Params, apply_overrides, invalid_settings, load_params, parse_override


def add_set_argument(parser: argparse.ArgumentParser, help_text: str) -> None:
    """The repeatable `--set KEY=VALUE` flag (into `args.overrides`) every CLI that takes overrides shares."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=help_text,
    )


def write_overrides(path: str | Path, overrides: list[str]) -> Params:
    """Validate overrides, then set them in the params file keeping its comments (like `dvc exp run -S`)."""
    from ruamel.yaml import YAML

    path = Path(path)
    params = load_params(path, overrides)  # validates everything first: nothing is written on error
    rt = YAML()
    rt.preserve_quotes = True
    with open(path, encoding="utf-8") as fh:
        doc = rt.load(fh)
    for text in overrides:
        keys, value = parse_override(text)
        node = doc
        for part in keys[:-1]:
            if part not in node:
                node[part] = {}
            node = node[part]
        node[keys[-1]] = value
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        rt.dump(doc, fh)
    tmp.replace(path)
    return params


# --- typed overrides (the Prefect run form, the flow's --set) ---------------------------------------


def _optional_fields(model: type[BaseModel]) -> type[BaseModel]:
    """The same sections and keys as `model`, every one optional (None = keep params.yaml's value)."""
    fields: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            annotation = _optional_fields(annotation)
        fields[name] = (annotation | None, Field(None, description=field.description))
    return create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"), **fields)


ParamsOverrides = _optional_fields(Params)
ParamsOverrides.__doc__ = (
    "Settings to change for one run, by section and key; unset keys keep params.yaml's value. "
    "The whole result is validated against params.yaml's rules before any stage runs."
)


def overrides_to_strings(overrides: BaseModel | dict[str, Any] | None) -> list[str]:
    """Typed overrides as `section.key=value` strings (the form `--set` and `dvc exp run -S` take)."""
    if overrides is None:
        return []
    data = overrides.model_dump(exclude_none=True) if isinstance(overrides, BaseModel) else overrides

    def flatten(prefix: str, node: Any) -> list[str]:
        if isinstance(node, dict) and not (prefix.endswith("augment.policy")):
            return [
                item for key, value in node.items() for item in flatten(f"{prefix}.{key}" if prefix else key, value)
            ]
        return [f"{prefix}={json.dumps(node)}"]

    return flatten("", data)


def overrides_from_strings(texts: list[str]) -> BaseModel:
    """`--set section.key=value` strings as typed overrides (each key checked, values read as YAML)."""
    nested = apply_overrides({}, texts)
    try:
        return ParamsOverrides.model_validate(nested)
    except ValidationError as exc:
        raise invalid_settings(exc, "--set") from None
