"""The ``search`` section: an Optuna search space over architecture and recipe keys, checked before any trial."""

from __future__ import annotations

import itertools
import operator
import re
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator

from study.config.sections import Section, TrainConfig
from study.training.models import Architecture, Network

_CONDITION = re.compile(r"^\s*(\w+)\s*(==|!=|>=|<=|>|<)\s*([^<>=!\s].*?)\s*$")
_OPERATORS = {
    "==": operator.eq,
    "!=": operator.ne,
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
}


@dataclass(frozen=True)
class Condition:
    """A parsed ``when:`` of a search dimension: ``KEY OP VALUE``, e.g. ``blocks > 2``."""

    key: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> Condition:
        match = _CONDITION.match(text)
        try:
            key, op, raw = match.groups()
            return cls(key, op, yaml.safe_load(raw))
        except (AttributeError, yaml.YAMLError):
            raise ValueError(
                f"condition {text!r}: expected 'KEY OP VALUE' with OP one of {' '.join(_OPERATORS)}, e.g. 'blocks > 2'"
            ) from None

    def holds(self, sampled: dict[str, Any]) -> bool:
        """True when the key was sampled and its value satisfies the condition."""
        return self.key in sampled and _OPERATORS[self.op](sampled[self.key], self.value)


class SearchDimension(Section):
    """One searched key: exactly one of choice / uniform / loguniform / int_range,
    optionally only ``when`` a condition on a key listed before it holds."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = None
    when: str | None = None  # e.g. "blocks > 2"

    @property
    def values(self) -> list[Any]:
        """The values to check against the key's type: every choice, or both ends of a range."""
        for kind in ("choice", "uniform", "loguniform", "int_range"):
            if getattr(self, kind) is not None:
                return list(getattr(self, kind))
        return []

    @property
    def condition(self) -> Condition | None:
        return Condition.parse(self.when) if self.when else None


# Recipe keys a search may set beside the architecture's; augment_strength is train.augment.strength.
SEARCHABLE_TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "epochs", "warmup_epochs", "augment_strength")


def train_params(params: dict[str, Any]) -> dict[str, Any]:
    """The searched recipe keys of ``params`` as TrainConfig fields (``augment_strength`` -> augment.strength)."""
    train = {k: v for k, v in params.items() if k in SEARCHABLE_TRAIN_KEYS and k != "augment_strength"}
    if "augment_strength" in params:
        train["augment"] = {"strength": params["augment_strength"]}
    return train


def check_space(space: dict[str, SearchDimension], model: Architecture | Network | None) -> None:
    """Every key searchable, exactly one kind each, values of the key's type, conditions well formed.

    The model's keys are the architecture's fields, or a user network's keyword
    arguments (any key when it takes ``**kwargs``); ``model`` None (itself
    invalid) checks the training keys only.
    """
    if isinstance(model, Network):
        names = model.keyword_names()
        model_keys = None if names is None else sorted(names)
    else:
        model_keys = list(Architecture.model_fields)
    problems = []
    earlier: list[str] = []
    for key, dim in space.items():
        kinds = [k for k in ("choice", "uniform", "loguniform", "int_range") if getattr(dim, k) is not None]
        searchable = key in SEARCHABLE_TRAIN_KEYS or model is None or model_keys is None or key in model_keys
        if not searchable:
            problems.append(
                f"cannot search {key!r}; searchable keys: {', '.join([*model_keys, *SEARCHABLE_TRAIN_KEYS])}"
            )
        elif len(kinds) != 1:
            problems.append(f"{key}: give exactly one of choice, uniform, loguniform, int_range")
        elif (
            key in Architecture.model_fields
            and Architecture.model_fields[key].annotation is int
            and kinds[0] in ("uniform", "loguniform")
            and isinstance(model, Architecture)
        ):
            problems.append(f"{key}: an integer; search it with choice or int_range")
        elif key in SEARCHABLE_TRAIN_KEYS or isinstance(model, Architecture):  # a user network's types are its own
            for value in dim.values:
                try:
                    if key in SEARCHABLE_TRAIN_KEYS:
                        TrainConfig.model_validate(train_params({key: value}))
                    else:
                        Architecture.model_validate({key: value})
                except ValidationError as err:
                    problems.append(f"{key}: value {value!r} is not valid: {err.errors()[0]['msg']}")
        if dim.when is not None:
            try:
                condition = Condition.parse(dim.when)
            except ValueError as err:
                problems.append(f"{key}.when: {err}")
            else:
                if condition.key not in earlier:
                    problems.append(
                        f"{key}.when: {condition.key!r} is not a key listed before {key!r} in the "
                        f"space ({', '.join(earlier) or 'none'}); a condition can only use those"
                    )
        earlier.append(key)
    if problems:
        raise ValueError("; ".join(problems))


GEOMETRY_KEYS = ("blocks", "kernel_size", "convs_per_block", "padding")  # what decides whether a CNN fits a grid


def unfit_choices(space: dict[str, SearchDimension], model: Architecture, shape: tuple[int, int, int]) -> list[str]:
    """The combinations of searched geometry keys whose network does not fit the grid (no voxel left).

    A conditional key takes its values where its condition can hold and the
    model section's value where it can fail (both, when the condition is on a
    key that is not a geometry key).
    """
    options: list[list[tuple[str, Any]]] = []
    for key, dim in space.items():
        if key in GEOMETRY_KEYS:
            values = (
                dim.choice
                if dim.choice is not None
                else list(range(dim.int_range[0], dim.int_range[1] + 1))
                if dim.int_range is not None
                else []
            )
            options.append([(key, v) for v in values] + ([(key, None)] if dim.when else []))  # None: not sampled
    if not options:
        return []
    unfit = []
    for combination in itertools.product(*options):
        sampled: dict[str, Any] = {}  # what a trial samples, as the search's conditions see it
        for key, value in combination:
            condition = space[key].condition
            holds = condition is None or condition.key not in GEOMETRY_KEYS or condition.holds(sampled)
            fails = condition is not None and (condition.key not in GEOMETRY_KEYS or not condition.holds(sampled))
            if value is not None and holds:
                sampled[key] = value
            elif not (value is None and fails):
                break
        else:
            if min(model.model_copy(update=sampled).feature_shape(shape)) < 1:
                unfit.append(", ".join(f"{k}={v}" for k, v in sampled.items()))
    return sorted(set(unfit))


class SearchConfig(Section):
    """Architecture search with Ray Tune + Optuna (TPE) inside each outer fold.

    Trials train on the fold's first inner split only, so no held-out subject
    is ever seen by the search; ASHA stops bad trials early.
    """

    space: dict[str, SearchDimension]
    num_samples: int = Field(8, ge=1)  # trials per outer fold
    max_concurrent: int = Field(2, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1)  # epochs before ASHA may stop a trial
    metric: Literal["val_loss", "val_roc_auc", "val_accuracy", "val_mae"] = "val_loss"
    seed: int = 0

    @field_validator("space")
    @classmethod
    def _space_is_searchable(
        cls, space: dict[str, SearchDimension], info: ValidationInfo
    ) -> dict[str, SearchDimension]:
        # The study's model, validated before the search (StudyConfig puts it in the validation context);
        # none there, our CNN; "class" marks a user's network that is itself invalid; no context (a config
        # validated without parse_config): the training keys only.
        model = None if info.context is None else info.context.get("model", Architecture())
        check_space(space, None if model == "class" else model)
        return space

    @property
    def mode(self) -> str:
        return "min" if self.metric in ("val_loss", "val_mae") else "max"
