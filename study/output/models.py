"""The study's models in MLflow: each fold's CNN as a logged model, and the folds' ensemble, registered and
found again (:func:`resolve_model`, :func:`download_ensemble`) for ``study predict``.

A fold's CNN is logged in pickle format, so that its modules stay hookable for
attribution. The ensemble (:class:`study.predict.Ensemble`) is a pyfunc model
that carries this package's code and names its requirements, so it loads
without the project installed, and it is registered under the study's name.
"""

from __future__ import annotations

import logging
import re
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow.artifacts
import mlflow.pyfunc
import mlflow.pytorch
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelOutput
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME

from study.errors import ModelNotFoundError
from study.output.tracking import Tracker
from study.predict import Ensemble
from study.runtime import environment

# What a study's ensemble needs where it is loaded (pinned to the versions that saved it).
ENSEMBLE_REQUIREMENTS = (
    "mlflow",
    "torch",
    "numpy",
    "pandas",
    "scipy",
    "nibabel",
    "nilearn",
    "pydantic",
    "pyyaml",
    "tqdm",
)


def log_model(tracker: Tracker, run_id: str, model: Any, input_shape: tuple[int, ...], name: str = "model") -> str:
    """Log a torch model as a logged model of ``run_id`` (a fold's CNN); returns its model id.

    Pickle format, so that its modules stay hookable for attribution; loading
    it needs the ``study`` package importable. Requirements are declared, as
    MLflow's own inference starts a subprocess and costs ~15 s a model.
    """
    example = np.zeros((2, 1, *input_shape), dtype=np.float32)  # batch 2: a free batch dimension
    requirements = [f"torch=={version('torch').split('+')[0]}", f"numpy=={version('numpy')}"]
    logged = tracker.client.create_logged_model(tracker.experiment_id, name=name, source_run_id=run_id)
    with (
        environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"),
        tempfile.TemporaryDirectory() as tmp,
        _quiet("mlflow.pytorch"),
    ):
        mlflow.pytorch.save_model(
            model.cpu(),
            Path(tmp) / name,
            input_example=example,
            serialization_format="pickle",
            pip_requirements=requirements,
            metadata={"model_id": logged.model_id},
        )
        tracker.client.log_model_artifacts(logged.model_id, str(Path(tmp) / name))
    tracker.client.finalize_logged_model(logged.model_id, "READY")
    tracker.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    return logged.model_id


def log_ensemble(
    tracker: Tracker, run_id: str, ensemble: Path, signature: ModelSignature, registered_name: str, task: str
) -> tuple[str, str]:
    """Log a saved :class:`study.predict.Ensemble` as a pyfunc model of ``run_id`` and register it.

    The model carries the ``study`` package's code, so loading it needs only
    the requirements it declares, not this project installed. Returns the
    logged model's id and the registered version.
    """
    from study import predict

    example = pd.DataFrame({"image": ["sub-01/anat/sub-01_T1w.nii.gz"], "subject_id": ["01"]})
    for column in [c for c in signature.inputs.input_names() if c not in ("image", "subject_id", "brain_mask")]:
        example[column] = [""]  # a confound that the study removed from its images (cv.adjust)
    requirements = [f"{p}=={version(p).split('+')[0]}" for p in ENSEMBLE_REQUIREMENTS]
    logged = tracker.client.create_logged_model(
        tracker.experiment_id, name="ensemble", source_run_id=run_id, model_type="study-ensemble"
    )
    # Saving, uploading and registering copy the model's files with progress bars that only clutter the
    # study's console (in a log file, one long line of carriage returns).
    with (
        environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"),
        tempfile.TemporaryDirectory() as tmp,
        _quiet("mlflow"),
    ):
        mlflow.pyfunc.save_model(
            Path(tmp) / "ensemble",
            python_model=predict.StudyEnsemble(),
            artifacts={"ensemble": str(ensemble)},
            code_paths=[str(Path(predict.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=requirements,
            metadata={"model_id": logged.model_id},
        )
        _forget_artifact_sources(Path(tmp) / "ensemble")
        tracker.client.log_model_artifacts(logged.model_id, str(Path(tmp) / "ensemble"))
    tracker.client.finalize_logged_model(logged.model_id, "READY")
    tracker.client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=0)])
    try:
        tracker.client.get_registered_model(registered_name)
    except MlflowException:
        tracker.client.create_registered_model(
            registered_name,
            description=f"{task} from T1w MRI: the outer folds' CNNs of study {registered_name} as "
            "one ensemble, with its preprocessing. Apply it to new images: "
            f"study predict models:/{registered_name}/VERSION IMAGES...",
        )
    # The artifact location, not models:/<id>: MLflow resolves the latter through the global tracking URI.
    with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):
        registered = tracker.client.create_model_version(
            registered_name, logged.artifact_location, run_id=run_id, model_id=logged.model_id
        )
    return logged.model_id, registered.version


def _forget_artifact_sources(model_dir: Path) -> None:
    """Replace each pyfunc artifact's source ``uri`` in ``model_dir``'s MLmodel by its path inside the model.

    MLflow records where an artifact was copied from (here the study folder, a home
    directory on most machines) in every copy of the model; loading reads only
    ``path``, so the shared model need not say where it was made.
    """
    model = Model.load(model_dir / MLMODEL_FILE_NAME)
    for artifact in model.flavors["python_function"].get("artifacts", {}).values():
        artifact["uri"] = artifact["path"]
    model.save(model_dir / MLMODEL_FILE_NAME)


class _quiet:
    """Raise a logger's level to ERROR inside a block (MLflow warns about pickle on every save)."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self) -> None:
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: object) -> None:
        self.logger.setLevel(self.level)


def download_ensemble(model_uri: str, tracking_uri: str, directory: Path, trust_code: bool = False) -> Ensemble:
    """A registered or logged study model's :class:`Ensemble`, read from its files into ``directory``.

    Only the ensemble's weights (``weights_only``) and JSON are read: the
    pyfunc's pickle and code, which ``mlflow.pyfunc.load_model`` would run, are
    not (MLflow serving still loads the pyfunc).
    """
    from study.runtime import environment

    mlflow.set_tracking_uri(tracking_uri)  # a models:/ URI is resolved through the global registry
    with environment(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false"):  # a bar per file, over the table it prints
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(directory)))
    return Ensemble.load(local / "artifacts" / "ensemble", trust_code)


def resolve_model(name: str, client: mlflow.MlflowClient) -> str:
    """A model URI for ``name``: a ``models:/`` or ``runs:/`` URI as given, a registered study name (its newest
    version), or a study's MLflow run id (the ensemble it logged)."""
    if name.startswith(("models:/", "runs:/")):
        return name
    versions = client.search_model_versions(f"name = '{name}'")
    if versions:
        return f"models:/{name}/{max(int(v.version) for v in versions)}"
    if re.fullmatch(r"[0-9a-f]{32}", name):
        try:
            run = client.get_run(name)
        except mlflow.MlflowException:
            run = None
        if run is not None:
            logged = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{name}'")
            ensembles = [m for m in logged if m.name == "ensemble"]
            if ensembles:
                return f"models:/{ensembles[0].model_id}"
    known = sorted({m.name for m in client.search_registered_models()})
    raise ModelNotFoundError(
        f"no study model {name!r} in {client.tracking_uri}: give models:/NAME/VERSION, a study name "
        f"({', '.join(known) or 'none registered yet: run a study first'}) or a study's run id; set --tracking-uri "
        "(or MLFLOW_TRACKING_URI) if the study logged elsewhere"
    )
