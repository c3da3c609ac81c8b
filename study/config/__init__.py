"""The study YAML: a typed schema with defaults, validated strictly, all errors at once.

A study is data: one YAML file under ``tune_configs/`` is parsed into a
:class:`StudyConfig`. Unknown keys and wrong types are errors that name the key
and list the valid ones, so a typo never silently falls back to a default; an
error in a ``--set`` override names the override.

Layout. :mod:`.sections` holds the stages' sections (grid, folds, training,
resources, tracking, maps), :mod:`.search` the search space and its checks,
:mod:`.study` the root that joins them, and :mod:`.loading` the reading of a
file with its overrides. Sections that are an algorithm's parameters (the
architecture and a user's network, augmentation, Meaningful Perturbations, the
cohort and its synthetic generator) are that algorithm's own class, defined
beside it in ``training/``, ``attribution/`` and ``data/``: this package imports
them, and they import nothing from here, so the config resolves into plain typed
values with no translation and no import circle.
"""

from study.config.loading import load_config, parse_config
from study.config.search import SEARCHABLE_TRAIN_KEYS, SearchConfig, SearchDimension, train_params
from study.config.sections import (
    AttributionConfig,
    CVConfig,
    PreprocessConfig,
    ResourcesConfig,
    SanityConfig,
    TrackingConfig,
    TrainConfig,
)
from study.config.study import StudyConfig

__all__ = [
    "AttributionConfig",
    "CVConfig",
    "PreprocessConfig",
    "ResourcesConfig",
    "SEARCHABLE_TRAIN_KEYS",
    "SanityConfig",
    "SearchConfig",
    "SearchDimension",
    "StudyConfig",
    "TrackingConfig",
    "TrainConfig",
    "load_config",
    "parse_config",
    "train_params",
]
