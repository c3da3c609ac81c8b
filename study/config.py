"""The study YAML: a typed schema with defaults, validated strictly, all errors at once.

A study is data: one YAML file under ``tune_configs/`` is parsed into a
:class:`StudyConfig`. Unknown keys and wrong types are errors that name the key
and list the valid ones, so a typo never silently falls back to a default; an
error in a ``--set`` override names the override. Sections that are an
algorithm's parameters (the architecture, augmentation, Meaningful
Perturbations, a synthetic cohort) are that algorithm's own class, so the
config resolves into plain typed values with no translation.
"""

from __future__ import annotations

import itertools
import operator
import typing
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from study.attribution import METHODS
from study.attribution.perturbation import Perturbation
from study.data.cohort import CohortConfig
from study.data.volumes import Grid
from study.storage import project_dir
from study.training.augment import Augmentation
from study.training.models import PRESETS, Architecture, Network, check_network, check_relu_only


class ConfigError(ValueError):
    """A study config that cannot be used; the message says which key and why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(_Section):
    """Resampling onto the study grid (MNI-like, RAS) and intensity normalization."""

    voxel_size: float = Field(2.0, gt=0)
    shape: tuple[int, int, int] | None = None  # default: the MNI box at voxel_size
    normalize: Literal["zscore", "none"] = "zscore"
    cache_dir: Path = Path("study_data/cache")

    @property
    def grid(self) -> Grid:
        """The study grid: isotropic ``voxel_size``, centred on the MNI152 brain box."""
        return Grid.mni(self.voxel_size, self.shape)


class CVConfig(_Section):
    """Subject-level k-fold cross-validation, stratified by class (cohort.label), grouped by family."""

    outer_folds: int = Field(5, ge=2)
    inner_folds: int = Field(3, ge=2)
    seed: int = 0


class TrainConfig(_Section):
    """The training recipe: budget, optimizer, schedule, augmentation; precision follows the device.

    ``final_fit`` says how each outer fold's final model comes about:
    ``all_subjects`` trains it on all of the fold's training subjects for
    ``epochs`` epochs; ``early_stopped`` first chooses the number of epochs on the
    fold's first inner split (early stopping with ``patience``), then trains on
    all training subjects for that many; ``inner_split`` keeps the model chosen
    on the inner split (it never sees that split's validation subjects,
    one of ``cv.inner_folds`` parts of the fold's training subjects).
    """

    final_fit: Literal["all_subjects", "early_stopped", "inner_split"] = "all_subjects"
    epochs: int = Field(40, ge=1)  # the budget (the most epochs, when early-stopped)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)  # AdamW's peak learning rate
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)  # linear warm-up of the learning rate
    schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up (cosine: decay to 0 at the last epoch)
    clip_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    patience: int = Field(15, ge=1)  # early stopping: epochs without a better validation loss before stopping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool | None = None  # None: on GPU only (4x faster for 3D convs there)
    compile: bool = False
    augment: Augmentation = Field(default_factory=Augmentation)
    seed: int = 0


class ResourcesConfig(_Section):
    """What the study may use: the same config runs on a laptop, a GPU box or a cluster."""

    num_workers: int = Field(1, ge=1)  # data-parallel workers per training run
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0)
    # Outer folds trained at once; above 1, the label-randomization check's model trains beside them too
    # (one more training at once, as resources allow), else after the folds.
    concurrent_folds: int = Field(1, ge=1)
    num_cpus: int | None = Field(None, ge=1)  # a local Ray's CPUs (ignored on a cluster)
    # Restarts of a training run from its last checkpoint after a worker or node is lost
    # (a preempted spot instance); 0 fails at once, which suits a laptop.
    max_failures: int = Field(0, ge=0)
    # How often a final fit saves a checkpoint to resume from (each save costs Ray Train about 2 s).
    checkpoint_every_s: float = Field(30.0, gt=0)
    # An autoscaling cluster (cluster.yaml) adds the nodes a study asks for: do not refuse a request that no
    # node can run yet. Off: a request no node has is refused at start (an autoscaler v2 cluster's node types
    # count as nodes; a v1 cluster, as `ray up` starts by default, publishes none).
    wait_for_nodes: bool = False

    @model_validator(mode="after")
    def _one_gpu_per_ddp_rank(self) -> "ResourcesConfig":
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise ValueError(f"gpus_per_worker {self.gpus_per_worker:g} with num_workers {self.num_workers}: Ray may "
                             "put two DDP ranks on one GPU, which NCCL refuses; give each worker a whole GPU "
                             "(gpus_per_worker: 1) or train with num_workers: 1")
        return self

    @property
    def worker_bundle(self) -> dict[str, float]:
        """What one training worker asks of a node."""
        return {"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker} if self.use_gpu else {})


class TrackingConfig(_Section):
    """Where MLflow writes: a tracking server URI, or the local SQLite default."""

    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default: the study name


class SanityConfig(_Section):
    """Sanity checks of the maps (Adebayo et al. 2018)."""

    subjects: int = Field(4, ge=1)  # held-out subjects of the first fold that are re-explained
    label_randomization: bool = True  # train a model on shuffled labels and compare its maps


class AttributionConfig(_Section):
    """Voxel-wise explanations of every held-out subject, on a pool of Ray actors."""

    methods: list[Literal[tuple(METHODS)]] = Field(  # type: ignore[valid-type]
        default_factory=lambda: ["gradcam", "guided_backprop", "perturbation"]
    )
    # The score each map explains. contrast (class 1 minus class 0 logit, e.g. male - female) asks every subject
    # the same question, so the two classes' maps can be compared; true_class / predicted_class maps cannot, and
    # get no group test. Under contrast, Grad-CAM keeps the magnitude (evidence for either class) and Meaningful
    # Perturbations deletes the evidence for the model's own decision on each subject.
    target: Literal["contrast", "true_class", "predicted_class"] = "contrast"
    batch_size: int = Field(8, ge=1)
    actors: int | None = Field(None, ge=1)  # default: as many as fit on the GPUs, else 2
    gpus_per_actor: float = Field(1.0, gt=0)
    perturbation: Perturbation = Field(default_factory=Perturbation)
    permutations: int = Field(1000, ge=0)  # class 1 vs class 0 permutation test (FWER, max statistic)
    sanity: SanityConfig = Field(default_factory=SanityConfig)
    atlas: Path | None = None  # labelled NIfTI for the region table
    atlas_names: Path | None = None  # TSV/CSV with columns label, name
    subject_nifti: bool = False  # also write each subject's maps as NIfTI


_CONDITION = re.compile(r"^\s*(\w+)\s*(==|!=|>=|<=|>|<)\s*([^<>=!\s].*?)\s*$")
_OPERATORS = {"==": operator.eq, "!=": operator.ne, ">=": operator.ge, "<=": operator.le,
              ">": operator.gt, "<": operator.lt}


@dataclass(frozen=True)
class Condition:
    """A parsed ``when:`` of a search dimension: ``KEY OP VALUE``, e.g. ``blocks > 2``."""

    key: str
    op: str
    value: Any

    @classmethod
    def parse(cls, text: str) -> "Condition":
        match = _CONDITION.match(text)
        try:
            key, op, raw = match.groups()
            return cls(key, op, yaml.safe_load(raw))
        except (AttributeError, yaml.YAMLError):
            raise ValueError(f"condition {text!r}: expected 'KEY OP VALUE' with OP one of "
                             f"{' '.join(_OPERATORS)}, e.g. 'blocks > 2'") from None

    def holds(self, sampled: dict[str, Any]) -> bool:
        """True when the key was sampled and its value satisfies the condition."""
        return self.key in sampled and _OPERATORS[self.op](sampled[self.key], self.value)


class SearchDimension(_Section):
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


def _check_space(space: dict[str, SearchDimension], model: Architecture | Network | None) -> None:
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
            problems.append(f"cannot search {key!r}; searchable keys: "
                            f"{', '.join([*model_keys, *SEARCHABLE_TRAIN_KEYS])}")
        elif len(kinds) != 1:
            problems.append(f"{key}: give exactly one of choice, uniform, loguniform, int_range")
        elif key in Architecture.model_fields and Architecture.model_fields[key].annotation is int \
                and kinds[0] in ("uniform", "loguniform") and isinstance(model, Architecture):
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
                    problems.append(f"{key}.when: {condition.key!r} is not a key listed before {key!r} in the "
                                    f"space ({', '.join(earlier) or 'none'}); a condition can only use those")
        earlier.append(key)
    if problems:
        raise ValueError("; ".join(problems))


GEOMETRY_KEYS = ("blocks", "kernel_size", "convs_per_block", "padding")  # what decides whether a CNN fits a grid


def _unfit(space: dict[str, SearchDimension], model: Architecture, shape: tuple[int, int, int]) -> list[str]:
    """The combinations of searched geometry keys whose network does not fit the grid (no voxel left).

    A conditional key takes its values where its condition can hold and the
    model section's value where it can fail (both, when the condition is on a
    key that is not a geometry key).
    """
    options: list[list[tuple[str, Any]]] = []
    for key, dim in space.items():
        if key in GEOMETRY_KEYS:
            values = dim.choice if dim.choice is not None else \
                list(range(dim.int_range[0], dim.int_range[1] + 1)) if dim.int_range is not None else []
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

    @field_validator("space")
    @classmethod
    def _space_is_searchable(cls, space: dict[str, SearchDimension], info: ValidationInfo) -> dict[str, SearchDimension]:
        # The study's model, validated before the search (StudyConfig puts it in the validation context);
        # none there, our CNN; "class" marks a user's network that is itself invalid; no context (a config
        # validated without parse_config): the training keys only.
        model = None if info.context is None else info.context.get("model", Architecture())
        _check_space(space, None if model == "class" else model)
        return space

    @property
    def mode(self) -> str:
        return "min" if self.metric == "val_loss" else "max"


def _model_kind(value: Any) -> str:
    """Which kind of ``model`` section: ``class`` (a user's network) or ``preset`` (our CNN)."""
    return "class" if isinstance(value, Network) or (isinstance(value, dict) and "class" in value) else "preset"


class StudyConfig(_Section):
    """A whole study: the root of the YAML file."""

    name: str
    cohort: CohortConfig
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    # `preset: mrinet` plus any key to override, or a network of your own: `class: package.module:Name` plus its
    # keyword arguments (see study.training.models.Network)
    model: Annotated[Annotated[Architecture, Tag("preset")] | Annotated[Network, Tag("class")],
                     Discriminator(_model_kind)] = Field(default_factory=Architecture)
    train: TrainConfig = Field(default_factory=TrainConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig | None = None  # null: train the model section's architecture as it is
    attribution: AttributionConfig | None = Field(default_factory=AttributionConfig)  # null: no maps
    output_dir: Path = Path("study_data/runs")  # splits, state, maps, report; shared by every node
    # Ray Train/Tune checkpoints: default <output_dir>/<name>/ray; s3://bucket/prefix on a cloud cluster
    storage_path: str | None = None

    @field_validator("name")
    @classmethod
    def _name_is_usable(cls, name: str) -> str:
        if not name or any(c in name for c in "/\\ "):
            raise ValueError("name must be non-empty, without spaces or slashes")
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
            built = check_network(model, info.data["preprocess"].grid.shape)
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
            unfit = _unfit(search.space, model, shape)
            if unfit:
                raise ValueError(f"space: {'; '.join(unfit[:3])}{' and more' if len(unfit) > 3 else ''} would leave "
                                 f"the last block no voxel of the study grid {shape} (preprocess.voxel_size "
                                 f"{preprocess.voxel_size} mm): such trials fail. Leave them out of the space (e.g. "
                                 "with when:) or choose a finer grid")
        return search

    @field_validator("attribution")
    @classmethod
    def _network_is_explainable(cls, attribution: AttributionConfig | None,
                                info: ValidationInfo) -> AttributionConfig | None:
        """Guided Backpropagation of a user's network: ReLU activations only, checked now."""
        model, preprocess = info.data.get("model"), info.data.get("preprocess")
        guided = attribution is not None and {"guided_backprop", "guided_gradcam"} & set(attribution.methods)
        if isinstance(model, Network) and preprocess is not None and guided:
            built = (info.context or {}).get("network")
            if built is None:  # validated without parse_config's context
                built = check_network(model, preprocess.grid.shape)
            check_relu_only(built, preprocess.grid.shape)
        return attribution


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
        origin = next((f"--set {assignment}" for path, assignment in overrides.items()
                       if loc[:len(path)] == path or path[:len(loc)] == loc), source)
        if e["type"] == "extra_forbidden":
            valid = ", ".join(_valid_keys(StudyConfig, e["loc"][:-1]))
            renamed = RENAMED.get(key)
            lines.append(f"  {key}: unknown key{f' (renamed: use {renamed})' if renamed else ''}; valid keys here: "
                         f"{valid}  [{origin}]")
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


def parse_config(data: dict[str, Any], source: str = "config", base_dir: Path | None = None,
                 overrides: dict[tuple[str, ...], str] | None = None) -> StudyConfig:
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
    def resolve(p: Path | None) -> Path | None:
        return None if p is None or p.is_absolute() else (base_dir / p)

    cohort = config.cohort
    cohort.root = resolve(cohort.root) or cohort.root
    if isinstance(cohort.participants, list):
        cohort.participants = [resolve(p) or p for p in cohort.participants]
    else:
        cohort.participants = resolve(cohort.participants) or cohort.participants
    config.preprocess.cache_dir = resolve(config.preprocess.cache_dir) or config.preprocess.cache_dir
    config.output_dir = resolve(config.output_dir) or config.output_dir
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
