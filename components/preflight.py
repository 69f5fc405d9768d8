"""Fail fast: check the whole settings file against what the stages will build, before any stage runs.

The schema (components.core.config) catches unknown keys, wrong types and ranges. This adds the checks
that need the libraries: the backbone exists and builds at this size, alpha and weights are
available, the unfreeze point lies inside the backbone, every augmentation transform and argument
is valid. Each problem is one line naming the key, the value and what is allowed.

    python -m components.preflight --params params.yaml [--set key=value ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from components.core import errors, runtime
from components.core.config import Params, ParamsError, load_params
from components.core.overrides import add_set_argument


def check_model(params: Params) -> tuple[list[str], object | None]:
    from components.modeling.backbones import build_backbone

    try:
        return [], build_backbone(params.model)
    except ParamsError as exc:
        return [str(exc)], None


def check_unfreeze(params: Params, backbone: object) -> list[str]:
    from components.modeling.backbones import get_spec, unfreeze_top

    try:
        unfreeze_top(
            backbone, params.finetune, get_spec(params.model.backbone).default_unfreeze_layers
        )  # a throwaway backbone: its trainable flags do not matter
    except ParamsError as exc:
        return [str(exc)]
    return []


def check_augment(params: Params) -> list[str]:
    from components.modeling.transforms import build_pipeline

    try:
        build_pipeline(params.augment.policy, params.project.seed)
    except ParamsError as exc:
        return [str(exc)]
    return []


def check_params(params: Params) -> list[str]:
    """Every problem found, as readable lines; empty when the settings will build."""
    problems, backbone = check_model(params)
    if backbone is not None:
        problems += check_unfreeze(params, backbone)
    problems += check_augment(params)
    return problems


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m components.preflight",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="settings file to check")
    add_set_argument(parser, "check with this setting changed (repeatable)")
    return parser


@errors.cli_errors("preflight")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
    except ParamsError as exc:
        print(f"preflight: {exc}", file=sys.stderr)
        return 2
    problems = check_params(params)
    if problems:
        print("preflight: invalid settings:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        return 2
    print(f"preflight: {args.params} is valid ({params.model.backbone}, {params.model.image_size}px)")
    return 0


if __name__ == "__main__":
    runtime.exit_process(main())
