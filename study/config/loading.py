"""Reading a study YAML: ``--set`` overrides, every error at once naming its key, paths from the project."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from study.config.study import StudyConfig
from study.errors import ConfigError
from study.storage import project_dir
from study.training.models import Architecture


def _classes_in(annotation: Any) -> list[type]:
    """The classes an annotation names, through unions and ``Annotated`` (the model section's kinds)."""
    if isinstance(annotation, type):
        return [annotation]
    return [c for arg in typing.get_args(annotation) for c in _classes_in(arg)]


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (the parent of an offending key)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        model = next((c for c in _classes_in(field.annotation) if issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields) + (["preset"] if model is Architecture else [])


RENAMED = {"cohort.sex_column": "cohort.label", "cohort.sex_mapping": "cohort.label_mapping"}


def _format_errors(err: ValidationError, source: str, overrides: dict[tuple[str, ...], str]) -> list[str]:
    """One line per error, each naming the key and where it came from (the file or a ``--set``)."""
    lines = []
    for e in err.errors():
        if e["loc"][:1] == ("model",) and e["loc"][1:2] in (("preset",), ("class",)):  # the kind, not a key
            e["loc"] = e["loc"][:1] + e["loc"][2:]
        loc = tuple(str(p) for p in e["loc"])
        key = ".".join(loc) or "(top level)"
        origin = next(
            (
                f"--set {assignment}"
                for path, assignment in overrides.items()
                if loc[: len(path)] == path or path[: len(loc)] == loc
            ),
            source,
        )
        if e["type"] == "extra_forbidden":
            valid = ", ".join(_valid_keys(StudyConfig, e["loc"][:-1]))
            renamed = RENAMED.get(key)
            lines.append(
                f"  {key}: unknown key{f' (renamed: use {renamed})' if renamed else ''}; valid keys here: "
                f"{valid}  [{origin}]"
            )
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing  [{origin}]")
        else:
            message = e["msg"].removeprefix("Value error, ")
            got = repr(e.get("input"))
            lines.append(f"  {key}: {message}{f' (got {got})' if len(got) <= 60 else ''}  [{origin}]")
    return lines


def _apply_override(data: dict[str, Any], assignment: str) -> tuple[str, ...]:
    """Apply one ``dotted.key=value`` override (the value parsed as YAML); returns the key path."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. cv.outer_folds=3")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {assignment!r}: the value is not valid YAML: {err}") from None
    return tuple(parts)


def parse_config(
    data: dict[str, Any],
    source: str = "config",
    base_dir: Path | None = None,
    overrides: dict[tuple[str, ...], str] | None = None,
) -> StudyConfig:
    """Validate a config mapping; relative paths are taken from ``base_dir`` if given.

    Every error is reported at once; ``overrides`` (key path -> ``--set`` text)
    lets an error name the override it came from instead of ``source``.
    """
    try:
        config = StudyConfig.model_validate(data, context={})  # context: the model, for the search space check
    except ValidationError as err:
        lines = _format_errors(err, source, overrides or {})
        raise ConfigError("\n".join([f"{source}: invalid study config ({len(lines)} problems)", *lines])) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _resolve_paths(config: StudyConfig, base_dir: Path) -> StudyConfig:
    """Every path of the config absolute: ``~`` expanded, relative ones taken from ``base_dir``; the atlas and
    its names must exist now, not when the maps are made after hours of training."""

    def resolve(p: Path | None) -> Path | None:
        if p is None:
            return None
        p = p.expanduser()
        return p if p.is_absolute() else base_dir / p

    cohort = config.cohort
    cohort.root = resolve(cohort.root) or cohort.root
    if isinstance(cohort.participants, list):
        cohort.participants = [resolve(p) or p for p in cohort.participants]
    else:
        cohort.participants = resolve(cohort.participants) or cohort.participants
    config.preprocess.cache_dir = resolve(config.preprocess.cache_dir) or config.preprocess.cache_dir
    config.output_dir = resolve(config.output_dir) or config.output_dir
    if config.attribution is not None:
        for key in ("atlas", "atlas_names"):
            path = resolve(getattr(config.attribution, key))
            if path is not None and not path.is_file():
                raise ConfigError(f"attribution.{key}: no file {path}; fix the path or leave the key out")
            setattr(config.attribution, key, path)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML, apply ``--set`` overrides, and validate it.

    Parameters
    ----------
    path : str or Path
        The study YAML, e.g. ``tune_configs/demo.yaml``.
    overrides : list of str, optional
        ``KEY=VALUE`` assignments (dotted keys, YAML values), as ``--set`` gives them.

    Returns
    -------
    StudyConfig
        The validated config. Relative paths in it are relative to the project
        directory: the directory a researcher runs ``study run`` from (the repo
        root for the shipped configs), or ``$STUDY_HOME`` (see
        :func:`study.storage.project_dir`).

    Raises
    ------
    ConfigError
        With every problem of the file and the overrides, one line each.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    applied = {}
    for assignment in overrides or []:
        applied[_apply_override(data, assignment)] = assignment
    return parse_config(data, source=str(path), base_dir=project_dir(), overrides=applied)
