"""The study YAML: a typed schema with defaults, validated strictly.

A study is data: one YAML file under ``tune_configs/`` is parsed into a
:class:`StudyConfig`. Unknown keys and wrong types are errors that name the key
and list the valid ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from study.storage import project_dir

# MNI152 bounding box (1 mm, 182 x 218 x 182) that every study grid covers.
MNI_BOX_MM = (182.0, 218.0, 182.0)
MNI_BOX_CENTRE_MM = (0.0, -18.0, 18.0)


class ConfigError(ValueError):
    """A study config that cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticCohort(_Section):
    """Generate a synthetic cohort into ``cohort.root`` when it does not exist yet."""

    subjects: int = Field(60, ge=4)
    voxel_size: float = Field(4.0, gt=0)
    effect_size: float = Field(0.25, ge=0)
    seed: int = 0


class CohortConfig(_Section):
    """Where the images and the participants table are, and how to read them."""

    root: Path
    participants: Path | None = None  # default: ROOT/participants.tsv
    layout: Literal["auto", "bids", "hcp", "column"] = "auto"
    hcp_image: Literal["acpc", "mni"] = "mni"
    subject_column: str = "participant_id"
    sex_column: str = "sex"
    # Values of the sex column -> "male"/"female"; M/F and male/female are known.
    sex_mapping: dict[str, Literal["male", "female"]] = Field(default_factory=dict)
    family_column: str | None = "family_id"
    path_column: str | None = None
    on_invalid: Literal["refuse", "exclude"] = "refuse"
    synthetic: SyntheticCohort | None = None

    @property
    def participants_path(self) -> Path:
        return self.participants or self.root / "participants.tsv"


class PreprocessConfig(_Section):
    """Resampling onto the study grid (MNI-like, RAS) and intensity normalization."""

    voxel_size: float = Field(2.0, gt=0)
    shape: tuple[int, int, int] | None = None  # default: the MNI box at voxel_size
    normalize: Literal["zscore", "none"] = "zscore"
    cache_dir: Path = Path("study_data/cache")

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        if self.shape is not None:
            return self.shape
        return tuple(int(math.floor(b / self.voxel_size + 0.5)) for b in MNI_BOX_MM)  # type: ignore[return-value]


class CVConfig(_Section):
    """Subject-level k-fold cross-validation, stratified by sex, grouped by family."""

    outer_folds: int = Field(5, ge=2)
    inner_folds: int = Field(3, ge=2)
    seed: int = 0


class ModelConfig(_Section):
    """The 3D CNN: a named preset, and any architecture key to override it."""

    preset: Literal["mrinet"] | None = "mrinet"
    blocks: int | None = Field(None, ge=1)
    width: int | None = Field(None, ge=1)
    growth: float | None = Field(None, gt=0)
    kernel_size: int | None = Field(None, ge=1)
    convs_per_block: int | None = Field(None, ge=1)
    norm: Literal["batch", "instance", "group", "none"] | None = None
    dropout: float | None = Field(None, ge=0, lt=1)
    head: Literal["flatten", "gap"] | None = None
    padding: int | None = Field(None, ge=0)

    def arch(self) -> dict[str, Any]:
        """The architecture dict that :func:`study.models.build_model` takes."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class AugmentConfig(_Section):
    """Augmentations that respect anatomy. Left-right flips are off by default:
    they would erase lateralized effects."""

    rotation_deg: float = Field(3.0, ge=0)
    translation_mm: float = Field(3.0, ge=0)
    scaling: float = Field(0.03, ge=0)
    intensity: float = Field(0.1, ge=0)
    flip_lr: bool = False


class TrainConfig(_Section):
    """The training budget and optimizer; precision and memory format follow the device."""

    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    patience: int = Field(8, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # None: on GPU only (4x faster for 3D convs there)
    compile: bool = False
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    seed: int = 0


class ResourcesConfig(_Section):
    """What the study may use: the same config runs on a laptop, a GPU box or a cluster."""

    num_workers: int = Field(1, ge=1)  # data-parallel workers per training run
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    concurrent_folds: int = Field(1, ge=1)
    num_cpus: int | None = Field(None, ge=1)  # a local Ray's CPUs (ignored on a cluster)
    # Restarts of a training run from its last checkpoint after a worker or node is lost
    # (a preempted spot instance); 0 fails at once, which suits a laptop.
    max_failures: int = Field(0, ge=0)


class TrackingConfig(_Section):
    """Where MLflow writes: a tracking server URI, or the local SQLite default."""

    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default: the study name


class PerturbationConfig(_Section):
    """Meaningful Perturbations (Fong & Vedaldi 2017) in 3D; defaults follow the paper."""

    variant: Literal["deletion", "preservation"] = "deletion"
    iterations: int = Field(300, ge=1)
    lr: float = Field(0.1, gt=0)
    l1: float = Field(0.01, ge=0)  # weight of the mask's area term
    tv: float = Field(0.2, ge=0)  # weight of the total-variation term (3 axes)
    tv_beta: float = Field(3.0, gt=0)
    mask_scale: int = Field(4, ge=1)  # the mask lives at 1/mask_scale of the grid (the paper: a quarter)
    blur_sigma_mm: float = Field(10.0, gt=0)
    jitter_voxels: int = Field(1, ge=0)


class SanityConfig(_Section):
    """Sanity checks of the maps (Adebayo et al. 2018)."""

    subjects: int = Field(4, ge=1)  # held-out subjects of the first fold that are re-explained
    label_randomization: bool = True  # train a model on shuffled labels and compare its maps


class AttributionConfig(_Section):
    """Voxel-wise explanations of every held-out subject, on a pool of Ray actors."""

    methods: list[Literal["gradcam", "guided_backprop", "perturbation", "guided_gradcam"]] = Field(
        default_factory=lambda: ["gradcam", "guided_backprop", "perturbation"]
    )
    target: Literal["true_class", "predicted_class", "contrast"] = "true_class"  # contrast: male minus female
    batch_size: int = Field(8, ge=1)
    actors: int | None = Field(None, ge=1)  # default: as many as fit on the GPUs, else 2
    gpus_per_actor: float = Field(1.0, gt=0)
    perturbation: PerturbationConfig = Field(default_factory=PerturbationConfig)
    permutations: int = Field(1000, ge=0)  # male-vs-female permutation test (FWER, max statistic)
    sanity: SanityConfig = Field(default_factory=SanityConfig)
    atlas: Path | None = None  # labelled NIfTI for the region table
    atlas_names: Path | None = None  # TSV/CSV with columns label, name
    subject_nifti: bool = False  # also write each subject's maps as NIfTI


class SearchDimension(_Section):
    """One searched key: exactly one of choice / uniform / loguniform / int_range,
    optionally only ``when`` a condition on already sampled keys holds."""

    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    int_range: tuple[int, int] | None = None
    when: str | None = None  # e.g. "blocks > 2"; keys sampled earlier are names here

    @model_validator(mode="after")
    def _one_kind(self) -> "SearchDimension":
        kinds = [k for k in ("choice", "uniform", "loguniform", "int_range") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of choice, uniform, loguniform, int_range")
        return self


SEARCHABLE_TRAIN_KEYS = {"lr", "weight_decay", "batch_size"}


def split_params(params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Searched params as (architecture keys, train keys)."""
    arch = {k: v for k, v in params.items() if k not in SEARCHABLE_TRAIN_KEYS}
    return arch, {k: v for k, v in params.items() if k in SEARCHABLE_TRAIN_KEYS}


class SearchConfig(_Section):
    """Architecture search with Ray Tune + Optuna (TPE) inside each outer fold.

    Trials train on the fold's first inner split only, so no held-out subject
    is ever seen by the search; ASHA stops bad trials early.
    """

    space: dict[str, SearchDimension]
    num_samples: int = Field(8, ge=1)  # trials per outer fold
    max_concurrent: int = Field(2, ge=1)
    scheduler: Literal["asha", "none"] = "asha"
    grace_period: int = Field(2, ge=1)  # epochs before ASHA may stop a trial
    metric: Literal["val_loss", "val_roc_auc", "val_accuracy"] = "val_loss"
    seed: int = 0

    @model_validator(mode="after")
    def _known_keys(self) -> "SearchConfig":
        valid = set(ModelConfig.model_fields) - {"preset"} | SEARCHABLE_TRAIN_KEYS
        unknown = sorted(set(self.space) - valid)
        if unknown:
            raise ValueError(f"cannot search {unknown}; searchable keys: {sorted(valid)}")
        return self

    @property
    def mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"


class StudyConfig(_Section):
    """A whole study: the root of the YAML file."""

    name: str
    cohort: CohortConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig | None = None  # null: train the model section's architecture as it is
    attribution: AttributionConfig | None = Field(default_factory=AttributionConfig)  # null: no maps
    output_dir: Path = Path("study_data/runs")  # splits, state, maps, report; shared by every node
    # Ray Train/Tune checkpoints: default <output_dir>/<name>/ray; s3://bucket/prefix on a cloud cluster
    storage_path: str | None = None

    @model_validator(mode="after")
    def _name_is_usable(self) -> "StudyConfig":
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError("name must be non-empty, without spaces or slashes")
        return self


def _valid_keys(model: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at ``loc`` (the parent of an offending key)."""
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = getattr(annotation, "__args__", (annotation,))
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if model is None:
            return []
    return sorted(model.model_fields)


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid study config"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            valid = ", ".join(_valid_keys(StudyConfig, e["loc"][:-1]))
            lines.append(f"  {key}: unknown key; valid keys here: {valid}")
        elif e["type"] == "missing":
            lines.append(f"  {key}: required key is missing")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def _apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. cv.outer_folds=3")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def parse_config(data: dict[str, Any], source: str = "config", base_dir: Path | None = None) -> StudyConfig:
    """Validate a config mapping; relative paths are taken from ``base_dir`` if given."""
    try:
        config = StudyConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source)) from None
    if base_dir is not None:
        config = _resolve_paths(config, base_dir)
    return config


def _resolve_paths(config: StudyConfig, base_dir: Path) -> StudyConfig:
    def resolve(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base_dir / p)

    cohort = config.cohort
    cohort.root = resolve(cohort.root) or cohort.root
    cohort.participants = resolve(cohort.participants) or cohort.participants
    config.preprocess.cache_dir = resolve(config.preprocess.cache_dir) or config.preprocess.cache_dir
    config.output_dir = resolve(config.output_dir) or config.output_dir
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> StudyConfig:
    """Read a study YAML, apply ``--set`` overrides, and validate it.

    Relative paths in the file are relative to the project directory: the
    directory a researcher runs ``study run`` from (the repo root for the
    shipped configs), or ``$STUDY_HOME`` (see :func:`study.storage.project_dir`).
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
    for assignment in overrides or []:
        _apply_override(data, assignment)
    return parse_config(data, source=str(path), base_dir=project_dir())
