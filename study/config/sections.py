"""The sections of a study YAML that configure the stages: grid, folds, training, resources, tracking, maps."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from study.attribution.methods import METHODS
from study.attribution.perturbation import Perturbation
from study.data.volumes import Grid
from study.training.augment import Augmentation


class Section(BaseModel):
    """A config section: unknown keys are errors, and assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PreprocessConfig(Section):
    """Resampling onto the study grid (MNI-like, RAS) and intensity normalization."""

    voxel_size: float = Field(2.0, gt=0)
    shape: tuple[int, int, int] | None = None  # default: the MNI box at voxel_size
    normalize: Literal["zscore", "none"] = "zscore"
    cache_dir: Path = Path("study_data/cache")

    @property
    def grid(self) -> Grid:
        """The study grid: isotropic ``voxel_size``, centred on the MNI152 brain box."""
        return Grid.mni(self.voxel_size, self.shape)


class CVConfig(Section):
    """Subject-level k-fold cross-validation, stratified by class (cohort.label), grouped by family.

    ``group_by``: one of ``cohort.confounds`` (e.g. ``site``) whose values each stay in one outer fold: with as
    many outer folds as sites, leave-site-out, which tests whether the models generalize to a scanner they never
    saw. Inner folds stay grouped by family.

    ``adjust``: remove ``cohort.confounds`` from the images inside each outer fold, fitted on its training
    subjects only and applied to the CNN's and the linear baseline's input alike (:mod:`study.data.adjustment`):
    ``residualize`` regresses every confound out of each voxel; ``combat`` harmonizes the one categorical
    confound (the site) with ComBat and regresses out the numeric ones. ``group_by``'s column is left in: the
    training subjects know nothing of a held-out site.
    """

    outer_folds: int = Field(5, ge=2)
    inner_folds: int = Field(3, ge=2)
    seed: int = 0
    group_by: str | None = None
    adjust: Literal["none", "residualize", "combat"] = "none"


class TrainConfig(Section):
    """The training recipe: budget, optimizer, schedule, augmentation; precision follows the device.

    ``final_fit`` says how each outer fold's final model comes about:
    ``all_subjects`` trains it on all of the fold's training subjects for
    ``epochs`` epochs; ``early_stopped`` first chooses the number of epochs on the
    fold's first inner split (early stopping with ``patience``), then trains on
    all training subjects for that many; ``inner_split`` keeps the model chosen
    on the inner split (it never sees that split's validation subjects,
    one of ``cv.inner_folds`` parts of the fold's training subjects).

    ``calibration`` says how each fold's probabilities are calibrated
    (:mod:`study.training.calibration`; BatchNorm's statistics are always
    re-estimated on the un-augmented training subjects first). ``recenter``
    (the default, free) moves the 0.5 threshold to midway between the two
    classes' median log-odds on the final model's own training subjects:
    on weak effects a training ends leaning to one class, and its training
    subjects show by how much. ``temperature`` fits a temperature, ``platt`` a
    temperature and a bias, on the predictions for the first inner split's
    validation subjects by a model that did not train on them: the
    selection's, or, when the epochs are chosen already (``all_subjects``, or
    after a search), a model trained for as many epochs on the inner training
    split, which costs about (inner_folds - 1) / inner_folds of the final fit
    again. That model is another training, whose confidence and lean need not
    be the final model's (docs/results.md, "Calibration"): right for
    ``final_fit: inner_split``, where it is the final model. ``none``:
    softmax's probabilities. Held-out subjects never calibrate. For a regression
    target (brain age), ``recenter`` undoes the line of the final model's
    predictions on its own training subjects' true values (its lean, and the
    regression to the mean it shows there: the field's bias correction, de Lange
    & Cole 2020, fitted without held-out subjects); ``none`` keeps the network's
    outputs in the target's unit.
    """

    final_fit: Literal["all_subjects", "early_stopped", "inner_split"] = "all_subjects"
    calibration: Literal["recenter", "temperature", "platt", "none"] = "recenter"
    # A regression target's loss on its standardized values (huber: quadratic within 1 sd, less hurt by outliers);
    # classification always uses cross-entropy
    loss: Literal["l1", "huber"] = "l1"
    epochs: int = Field(40, ge=1)  # the budget (the most epochs, when early-stopped)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(1e-3, gt=0)  # AdamW's peak learning rate
    weight_decay: float = Field(1e-4, ge=0)
    warmup_epochs: float = Field(2.0, ge=0)  # linear warm-up of the learning rate
    schedule: Literal["constant", "cosine"] = "constant"  # after the warm-up (cosine: decay to 0 at the last epoch)
    clip_grad_norm: float | None = Field(1.0, gt=0)  # None: no clipping
    patience: int = Field(15, ge=1)  # early stopping: epochs without a better validation loss before stopping
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU; fp32: no TF32 either
    channels_last: bool | None = None  # None: on GPU only (4x faster for 3D convs there)
    compile: bool = False
    augment: Augmentation = Field(default_factory=Augmentation)
    seed: int = 0


class ResourcesConfig(Section):
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
    def _one_gpu_per_ddp_rank(self) -> ResourcesConfig:
        if self.use_gpu and self.num_workers > 1 and self.gpus_per_worker < 1:
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g} with num_workers {self.num_workers}: Ray may "
                "put two DDP ranks on one GPU, which NCCL refuses; give each worker a whole GPU "
                "(gpus_per_worker: 1) or train with num_workers: 1"
            )
        return self

    @property
    def worker_bundle(self) -> dict[str, float]:
        """What one training worker asks of a node."""
        return {"CPU": self.cpus_per_worker} | ({"GPU": self.gpus_per_worker} if self.use_gpu else {})


class TrackingConfig(Section):
    """Where MLflow writes: a tracking server URI, or the local SQLite default."""

    uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str | None = None  # default: the study name


class SanityConfig(Section):
    """Sanity checks of the maps (Adebayo et al. 2018)."""

    subjects: int = Field(4, ge=1)  # held-out subjects of the first fold that are re-explained
    label_randomization: bool = True  # train a model on shuffled labels and compare its maps


class AttributionConfig(Section):
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
