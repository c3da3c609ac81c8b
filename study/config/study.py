"""The root of a study YAML: every section, and the checks that need more than one of them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, ValidationInfo, field_validator, model_validator

from study.attribution.gradcam import check_placement
from study.attribution.guided_backprop import check_relu_only
from study.attribution.methods import METHODS
from study.config.search import SearchConfig, unfit_choices
from study.config.sections import (
    AttributionConfig,
    CVConfig,
    PreprocessConfig,
    ResourcesConfig,
    Section,
    TrackingConfig,
    TrainConfig,
)
from study.data.cohort import CohortConfig
from study.training.models import PRESETS, Architecture, Network, check_network


def _model_kind(value: Any) -> str:
    """Which kind of ``model`` section: ``class`` (a user's network) or ``preset`` (our CNN)."""
    return "class" if isinstance(value, Network) or (isinstance(value, dict) and "class" in value) else "preset"


class StudyConfig(Section):
    """A whole study: the root of the YAML file."""

    name: str
    cohort: CohortConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    # `preset: mrinet` plus any key to override, or a network of your own: `class: package.module:Name` plus its
    # keyword arguments (see study.training.models.Network)
    model: Annotated[
        Annotated[Architecture, Tag("preset")] | Annotated[Network, Tag("class")], Discriminator(_model_kind)
    ] = Field(default_factory=Architecture)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig | None = None  # null: train the model section's architecture as it is
    attribution: AttributionConfig | None = Field(default_factory=AttributionConfig)  # null: no maps
    output_dir: Path = Path("study_data/runs")  # splits, state, maps, report; shared by every node
    # Ray Train/Tune checkpoints: default <output_dir>/<name>/ray; s3://bucket/prefix on a cloud cluster
    storage_path: str | None = None

    @field_validator("cv")
    @classmethod
    def _groups_are_a_confound(cls, cv: CVConfig, info: ValidationInfo) -> CVConfig:
        cohort = info.data.get("cohort")
        if cv.group_by is not None and cohort is not None and cv.group_by not in cohort.confounds:
            raise ValueError(
                f"group_by {cv.group_by!r} is not among cohort.confounds {cohort.confounds}: a column that the "
                "folds keep apart is a confound the verdict should look beyond too; add it there"
            )
        if cv.adjust == "combat" and cv.group_by is not None:
            raise ValueError(
                f"adjust: combat learns each site from its training subjects, and group_by holds each "
                f"{cv.group_by} out whole, so a held-out one has none; use adjust: residualize (group_by's column "
                "stays in the images, the other confounds are regressed out), or drop group_by"
            )
        if cv.adjust != "none" and cohort is not None and not set(cohort.confounds) - {cv.group_by}:
            besides = f" besides group_by {cv.group_by!r}, which stays in the images" if cohort.confounds else ""
            raise ValueError(
                f"adjust: {cv.adjust} removes cohort.confounds from the images, and there are none{besides}; name "
                "them in cohort.confounds (e.g. [site, tiv]), or set cv.adjust: none"
            )
        return cv

    @field_validator("name")
    @classmethod
    def _name_is_usable(cls, name: str) -> str:
        """A folder under output_dir, an MLflow experiment and a registered model: letters, digits, . _ -, not
        starting with a dot (``..`` would put the study outside output_dir)."""
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
            raise ValueError(
                "letters, digits, '.', '_' or '-', starting with a letter or digit (it names "
                "the study's folder under output_dir, its MLflow experiment and its registered model)"
            )
        return name

    @field_validator("model", mode="before")
    @classmethod
    def _preset(cls, value: Any, info: ValidationInfo) -> Any:
        """``{preset: mrinet, width: 8}``: the preset's architecture with the keys given overridden;
        ``{class: ...}``: a user's network, as it is."""
        if not isinstance(value, dict):
            return value
        if "class" in value:
            if info.context is not None:
                info.context["model"] = "class"  # replaced by the network once it is valid (_network_fits)
            if "preset" in value:
                raise ValueError("give either preset (our CNN) or class (your own network), not both")
            return value
        preset = value.get("preset") or "mrinet"
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
        return {**PRESETS[preset].model_dump(), **{k: v for k, v in value.items() if k != "preset"}}

    @field_validator("model")
    @classmethod
    def _network_fits(cls, model: Architecture | Network, info: ValidationInfo) -> Architecture | Network:
        """A user's network is built and run on one volume of the study grid now, not on a worker later."""
        if isinstance(model, Network) and "preprocess" in info.data:
            shape = info.data["preprocess"].grid.shape
            cohort = info.data.get("cohort")
            built = check_network(model, shape, cohort.target.outputs if cohort else 2)
            check_placement(built, shape, model.factory)
            if info.context is not None:  # the search space checks its keys against the network's;
                info.context.update(model=model, network=built)  # attribution's check reuses the build
        return model

    @field_validator("search")
    @classmethod
    def _space_fits_the_grid(cls, search: SearchConfig | None, info: ValidationInfo) -> SearchConfig | None:
        """Every network the search may sample fits the study grid (a trial that cannot be built is lost)."""
        model, preprocess = info.data.get("model"), info.data.get("preprocess")
        if search is not None and isinstance(model, Architecture) and preprocess is not None:
            shape = preprocess.grid.shape
            unfit = unfit_choices(search.space, model, shape)
            if unfit:
                raise ValueError(
                    f"space: {'; '.join(unfit[:3])}{' and more' if len(unfit) > 3 else ''} would leave "
                    f"the last block no voxel of the study grid {shape} (preprocess.voxel_size "
                    f"{preprocess.voxel_size} mm): such trials fail. Leave them out of the space (e.g. "
                    "with when:) or choose a finer grid"
                )
        return search

    @field_validator("attribution")
    @classmethod
    def _network_is_explainable(
        cls, attribution: AttributionConfig | None, info: ValidationInfo
    ) -> AttributionConfig | None:
        """Guided Backpropagation of a user's network: ReLU activations only, checked now."""
        model, preprocess = info.data.get("model"), info.data.get("preprocess")
        guided = attribution is not None and any(METHODS[m].needs_relu for m in attribution.methods)
        if isinstance(model, Network) and preprocess is not None and guided:
            built = (info.context or {}).get("network")
            if built is None:  # validated without parse_config's context
                cohort = info.data.get("cohort")
                built = check_network(model, preprocess.grid.shape, cohort.target.outputs if cohort else 2)
            check_relu_only(built, preprocess.grid.shape, model.factory)
        return attribution

    @model_validator(mode="after")
    def _target_is_supported(self) -> StudyConfig:
        """What a regression target (cohort.task: regression) or several classes do not have yet, refused before
        any work; and the regression-only search metric refused for classes."""
        if self.cohort.task != "regression":
            if self.search is not None and self.search.metric == "val_mae":
                raise ValueError("search.metric val_mae is a regression target's (cohort.task: regression)")
            return self._several_classes_are_supported()
        attribution = self.attribution
        unsupported = {
            "attribution.target": "use contrast, which for a regression target is the predicted value"
            if attribution is not None and attribution.target != "contrast"
            else None,
            "cohort.confounds": "remove them (the confound tests are built for two classes)"
            if self.cohort.confounds
            else None,
            "train.calibration": "remove it: a regression fold maps its output back to the target's unit instead"
            if self.train.calibration in ("temperature", "platt")
            else None,
            "search.metric": "use val_loss or val_mae"
            if self.search is not None and self.search.metric in ("val_roc_auc", "val_accuracy")
            else None,
        }
        problems = [f"{key}: {fix}" for key, fix in unsupported.items() if fix]
        if problems:
            raise ValueError(f"cohort.task regression ({self.cohort.label}): " + "; ".join(problems))
        return self

    def _several_classes_are_supported(self) -> StudyConfig:
        """What more than two classes do not have: one contrast for every subject (maps explain each subject's true
        class by default instead), and the confound tests."""
        if len(self.cohort.classes) < 3:
            return self
        attribution = self.attribution
        if attribution is not None and "target" not in attribution.model_fields_set:
            attribution.target = "true_class"
        unsupported = {
            "attribution.target": "use true_class (the logit of each subject's own class, the default here) or "
            "predicted_class: contrast compares two classes"
            if attribution is not None and attribution.target == "contrast"
            else None,
            "cohort.confounds": "remove them (the confound tests are built for two classes)"
            if self.cohort.confounds
            else None,
        }
        problems = [f"{key}: {fix}" for key, fix in unsupported.items() if fix]
        if problems:
            classes = ", ".join(self.cohort.classes)
            raise ValueError(f"{len(self.cohort.classes)} classes ({classes}): " + "; ".join(problems))
        return self
