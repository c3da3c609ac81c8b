"""Study configs: typos and wrong types are errors that name the key and the valid ones."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch

from study.config import load_config, parse_config
from study.errors import ConfigError
from study.output.tracking import default_uri
from study.storage import join
from study.training.models import Architecture, BrainCNN


def write(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return path


def test_unknown_key_lists_valid_keys(tmp_path):
    path = write(tmp_path, "name: s\ncohort: {root: x}\ncv: {outer_fold: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "cv.outer_fold: unknown key; valid keys here: adjust, group_by, inner_folds, outer_folds, seed" in str(
        err.value
    )


def test_a_typo_in_the_model_section_or_an_old_key_names_the_valid_ones(tmp_path):
    path = write(tmp_path, "name: s\ncohort: {root: x, sex_column: Gender}\nmodel: {preset: mrinet, widht: 8}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "model.widht: unknown key; valid keys here: blocks, convs_per_block, dropout" in str(err.value)
    assert "cohort.sex_column: unknown key (renamed: use cohort.label)" in str(err.value)


def test_wrong_type_and_missing_key(tmp_path):
    path = write(tmp_path, "name: s\npreprocess: {voxel_size: big}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "preprocess.voxel_size" in str(err.value) and "cohort: required key is missing" in str(err.value)


def test_overrides_and_defaults(tmp_path):
    path = write(tmp_path, "name: s\ncohort: {root: data}\n")
    config = load_config(path, ["cv.outer_folds=3", "preprocess.shape=[58, 70, 58]"])
    assert config.cv.outer_folds == 3 and config.preprocess.grid.shape == (58, 70, 58)
    assert config.cohort.root.is_absolute()
    assert load_config(path).preprocess.grid.shape == (91, 109, 91)
    with pytest.raises(ConfigError, match="cv.folds: unknown key"):
        load_config(path, ["cv.folds=3"])


def test_shipped_configs_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).resolve().parents[1] / "tune_configs").glob("*.yaml"))
    assert {p.stem for p in configs} >= {"demo", "demo_search", "demo_gpu", "paper"}
    for path in configs:
        config = load_config(path)
        assert config.name == path.stem


def test_relative_paths_resolve_in_the_project_directory(tmp_path, monkeypatch):
    path = tmp_path / "study.yaml"
    path.write_text("name: s\ncohort: {root: cohort}\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(path).cohort.root == tmp_path / "cohort"
    assert default_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A submitted Ray job runs in a temporary copy of its working dir: results go to ~/study instead ...
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"metadata": {"job_submission_id": "raysubmit_1"}}))
    assert load_config(path).output_dir == Path.home() / "study" / "study_data" / "runs"
    # ... or to $STUDY_HOME, where a cluster's shared file system is.
    monkeypatch.setenv("STUDY_HOME", str(tmp_path / "shared"))
    assert load_config(path).cohort.root == tmp_path / "shared" / "cohort"
    assert default_uri() == f"sqlite:///{tmp_path / 'shared' / 'mlflow.db'}"


def test_storage_locations_join_paths_and_cloud_uris():
    assert join("s3://bucket/ray", "demo", "run1") == "s3://bucket/ray/demo/run1"  # Path would give s3:/bucket
    assert join(Path("/data/runs"), "ray") == "/data/runs/ray"


def test_every_error_of_a_config_at_once_and_overrides_named(tmp_path):
    path = write(
        tmp_path,
        "name: 'has space'\ncohort: {root: x}\ncv: {outer_folds: 1}\n"
        "search: {num_samples: 0, space: {patience: {choice: [1, 2]}}}\n",
    )
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.batch_size=0", "model.width=wide"])
    message = str(err.value)
    assert "(6 problems)" in message  # not in rounds: the name and the search space along with the rest
    assert "name: letters, digits, '.', '_' or '-', starting with a letter or digit" in message
    assert "cv.outer_folds" in message and "search.num_samples" in message
    assert "search.space: cannot search 'patience'; searchable keys: blocks, width" in message
    assert "train.batch_size: Input should be greater than or equal to 1 (got 0)  [--set train.batch_size=0]" in message
    assert "model.width" in message and "[--set model.width=wide]" in message
    assert f"[{path}]" in message.split("cv.outer_folds")[1].splitlines()[0]


def test_search_conditions_are_checked_when_the_config_loads(tmp_path):
    def space(**dims):
        return {"name": "s", "cohort": {"root": "x"}, "search": {"space": dims}}

    with pytest.raises(ConfigError, match=r"kernel_size.when: 'blokcs' is not a key listed before 'kernel_size'"):
        parse_config(space(blocks={"choice": [2, 3]}, kernel_size={"choice": [3, 5], "when": "blokcs > 2"}))
    with pytest.raises(ConfigError, match=r"kernel_size.when: condition 'blocks >> 2': expected 'KEY OP VALUE'"):
        parse_config(space(blocks={"choice": [2, 3]}, kernel_size={"choice": [3, 5], "when": "blocks >> 2"}))
    with pytest.raises(ConfigError, match=r"width: value 0 is not valid"):  # a searched value escapes nothing
        parse_config(space(width={"choice": [0, 8]}))
    config = parse_config(space(blocks={"choice": [2, 3]}, kernel_size={"choice": [3, 5], "when": "blocks > 2"}))
    condition = config.search.space["kernel_size"].condition
    assert condition.holds({"blocks": 3}) and not condition.holds({"blocks": 2}) and not condition.holds({})


def test_a_network_of_ones_own_is_built_checked_and_searchable_when_the_config_loads():
    def config(search=None, methods=("gradcam", "guided_backprop"), **model):
        return {
            "name": "s",
            "cohort": {"root": "x"},
            "preprocess": {"voxel_size": 8.0},
            "model": {"class": "tests.networks:TinyNet", **model},
            "attribution": {"methods": list(methods)},
            **({"search": {"space": search}} if search else {}),
        }

    parsed = parse_config(config({"channels": {"choice": [2, 4]}, "lr": {"loguniform": [1e-4, 1e-2]}}, channels=2))
    assert parsed.model.factory == "tests.networks:TinyNet" and parsed.model.kwargs == {"channels": 2}
    assert parsed.model.model_dump() == {"class": "tests.networks:TinyNet", "channels": 2}  # as the config wrote it
    assert parse_config(parsed.model_dump(mode="json")) == parsed  # a logged config reads back
    problems = {
        "model: cannot import tests.nonets:Net: ModuleNotFoundError: No module named 'tests.nonets'. Install its "
        "package, or put tests/nonets.py in the project directory": config(**{"class": "tests.nonets:Net"}),
        "without a gradcam_layer: name the module Grad-CAM should explain in the config (model.gradcam_layer": config(
            gradcam=False
        ),
        "model: tests.networks:TinyNet has no module 'features.9' (gradcam_layer); its top-level modules: features, "
        "gradcam_layer, head": config(gradcam_layer="features.9"),
        # a function may do anything with the config's arguments (torch.hub.load runs a folder's hubconf.py)
        "model: torch.hub:load is a function, not a torch.nn.Module subclass": config(**{"class": "torch.hub:load"}),
        "returns (1, 3) for one volume; this study needs logits [batch, 2]": config(outputs=3),
        "cannot be built with input_shape=(23, 27, 23) and {'size': 3}: TypeError: ": config(size=3),
        "attribution: tests.networks:TinyNet: guided backprop needs ReLU activations; this model uses "
        "elu; use nn.ReLU, or leave guided_backprop": config(activation="elu"),
        "search.space: cannot search 'depth'; searchable keys: activation, blind, channels, gradcam, outputs, "
        "lr": config({"depth": {"choice": [2, 3]}}),
        "model: give either preset (our CNN) or class": config(preset="mrinet"),
        "tests.networks:ShortcutNet: Grad-CAM would place its 12 feature voxels of axis 0 at input voxels": config(
            **{"class": "tests.networks:ShortcutNet"}
        ),
    }
    for expected, data in problems.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            parse_config(data)
    assert parse_config(config(activation="elu", methods=["gradcam"])).model.kwargs == {"activation": "elu"}
    named = parse_config(config(gradcam=False, gradcam_layer="features.4")).model  # the layer named in the config
    assert named.gradcam_layer == "features.4" and named.kwargs == {"gradcam": False}
    assert parse_config(parsed.model_dump(mode="json") | {"model": named.model_dump()}).model == named
    assert parse_config(config(**{"class": "tests.networks:ShortcutNet", "shortcut_first": False})).model


def test_a_search_space_whose_networks_cannot_fit_the_grid_is_refused_when_the_config_loads():
    """The demo's search lost 3 of 8 trials to blocks=3 with kernel_size=5 on its 6 mm grid (30x36x30)."""

    def config(**space):
        return {"name": "s", "cohort": {"root": "x"}, "preprocess": {"voxel_size": 6.0}, "search": {"space": space}}

    unfit = dict(blocks={"choice": [2, 3]}, kernel_size={"choice": [3, 5], "when": "blocks > 2"})
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "search: space: blocks=3, kernel_size=5 would leave the last block no voxel of the study grid (30, 36, 30)"
        ),
    ):
        parse_config(config(**unfit))
    parse_config(config(blocks={"choice": [2, 3]}, kernel_size={"choice": [3, 5], "when": "blocks < 3"}))
    with pytest.raises(ConfigError, match=re.escape("convs_per_block=2, blocks=3")):  # an unconditional key too
        parse_config(config(convs_per_block={"int_range": [1, 2]}, blocks={"choice": [2, 3]}))
    assert parse_config({**config(**unfit), "preprocess": {"voxel_size": 3.0}}).search  # fits a finer grid
    with pytest.raises(ConfigError, match="blocks: an integer; search it with choice or int_range"):
        parse_config(config(blocks={"uniform": [2, 3]}))
    # A condition on a conditional key: kernel_size is sampled only with padding, which only 3 blocks sample.
    parse_config(
        config(
            blocks={"choice": [2, 3]},
            padding={"choice": [1], "when": "blocks > 2"},
            kernel_size={"choice": [3, 5], "when": "padding > 0"},
        )
    )


def test_the_feature_shape_arithmetic_matches_the_network():
    for blocks, kernel, convs, padding in itertools.product([1, 2, 3, 4], [1, 3, 5], [1, 2], [0, 1, 2]):
        architecture = Architecture(blocks=blocks, kernel_size=kernel, convs_per_block=convs, padding=padding, width=1)
        for shape in [(23, 27, 23), (30, 36, 30), (9, 12, 7)]:
            expected = architecture.feature_shape(shape)
            try:
                built = tuple(BrainCNN(architecture, shape).features(torch.zeros(1, 1, *shape)).shape[2:])
            except ValueError:  # the network refuses the grid: some axis ran out
                built = None
            assert (built is None and min(expected) < 1) or built == expected, (architecture, shape, expected)


def test_a_blur_width_without_its_reference_asks_which_reference(tmp_path):
    path = write(tmp_path, "name: s\ncohort: {root: x}\nattribution: {perturbation: {blur_sigma_mm: 6}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "attribution.perturbation" in str(err.value) and "set reference: blur" in str(err.value)
    assert load_config(path, ["attribution.perturbation.reference=blur"]).attribution.perturbation.reference == "blur"


def test_a_monai_network_is_explained_at_the_layer_the_config_names():
    """MONAI's networks take no input_shape and have no gradcam_layer attribute: the config names the layer."""
    pytest.importorskip("monai")
    from study.attribution import gradcam, guided_backprop
    from study.training.models import build_model

    data = {
        "name": "s",
        "cohort": {"root": "x"},
        "preprocess": {"voxel_size": 8.0},
        "model": {
            "class": "monai.networks.nets:DenseNet",
            "gradcam_layer": "class_layers.relu",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "init_features": 8,
            "growth_rate": 4,
            "block_config": [2, 2],
        },
    }
    config = parse_config(data)  # built, run on one volume, Grad-CAM placement and ReLUs checked
    model = build_model(config.model, config.preprocess.grid.shape).eval()
    x = torch.randn(2, 1, *config.preprocess.grid.shape)
    for method in (gradcam, guided_backprop):
        maps = method(model, x, None)
        assert maps.shape == (2, *config.preprocess.grid.shape) and torch.isfinite(maps).all() and maps.max() > 0
    with pytest.raises(ConfigError, match="monai.networks.nets:DenseNet has no module 'layer4' \\(gradcam_layer\\)"):
        parse_config({**data, "model": {**data["model"], "gradcam_layer": "layer4"}})


def test_names_and_paths_are_checked_when_the_config_loads(tmp_path, monkeypatch):
    """A name of '..' put the study outside output_dir; '~' became a folder named '~'; a missing atlas was
    found missing only after training."""
    monkeypatch.setenv("HOME", str(tmp_path))
    base = {"name": "s", "cohort": {"root": "x"}}
    for name in ("..", ".hidden", "a/b", "a b", ""):
        with pytest.raises(ConfigError, match="name: letters, digits"):
            parse_config({**base, "name": name})
    config = parse_config({**base, "output_dir": "~/runs", "cohort": {"root": "~/cohort"}}, base_dir=tmp_path / "p")
    assert config.output_dir == tmp_path / "runs" and config.cohort.root == tmp_path / "cohort"
    with pytest.raises(ConfigError, match=f"attribution.atlas: no file {tmp_path / 'p' / 'atlas.nii.gz'}"):
        parse_config({**base, "attribution": {"atlas": "atlas.nii.gz"}}, base_dir=tmp_path / "p")
    with pytest.raises(ConfigError, match=r"cohort.brain_mask: auto, none, mni152, or a path with \{subject\}"):
        parse_config({**base, "cohort": {"root": "x", "brain_mask": "masks/{sub}.nii.gz"}})
