"""The base of every params.yaml section model: the rules all settings share.

Unknown keys are errors (extra="forbid"), sections are frozen, no setting holds a URL with a credential
(components/core/credentials.py), and a boolean is never read as a number.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, ClassVar, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

from components.core.credentials import CREDENTIAL_HELP, credential_problem, strings_in

# A stage is called `validate`, which shadows pydantic's deprecated BaseModel.validate classmethod in every
# section with a key of that name (Params, the orchestration timeouts and retries); instance attribute
# access still returns the setting, so the warning is noise.
warnings.filterwarnings("ignore", message='Field name "validate"', category=UserWarning)


def _accepts_bool(annotation: Any) -> bool:
    if annotation is bool:
        return True
    return get_origin(annotation) in (Union, types.UnionType) and bool in get_args(annotation)


def _yaml_word(annotation: Any, value: bool) -> str | None:
    """YAML 1.1 reads unquoted on/off as true/false: the word back, where the field is a Literal of it."""
    word = "on" if value else "off"
    return word if get_origin(annotation) is Literal and word in get_args(annotation) else None


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Where a credential goes instead of a URL in this section's settings (its message when one is refused).
    credential_help: ClassVar[str] = CREDENTIAL_HELP

    @field_validator("*")
    @classmethod
    def _no_credentials(cls, value: Any) -> Any:
        # One rule for every setting, whatever its type: no URL in it (alone, or in a list or mapping)
        # holds a user name, password or token. Settings reach DVC's lock file, MLflow params and logs.
        for text in strings_in(value):
            problem = credential_problem(text)
            if problem:
                raise ValueError(f"a URL in this setting {problem}; {cls.credential_help}")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads `true` as 1 for an int field: `epochs: true` must be an error, not one epoch.
        if (
            isinstance(value, bool)
            and info.field_name
            and not _accepts_bool(cls.model_fields[info.field_name].annotation)
        ):
            word = _yaml_word(cls.model_fields[info.field_name].annotation, value)
            if word is not None:
                return word
            raise ValueError("expected a number or text, got a boolean (true/false)")
        return value
