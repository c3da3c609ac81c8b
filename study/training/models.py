"""The networks a study trains: the 3D CNN family (the paper's MriNet a preset), or a researcher's own.

A model is built by :func:`build_model` from an :class:`Architecture` or a
:class:`Network` (what the config's ``model`` section and a search's sampled
keys resolve to) and the input grid shape. Every model names its Grad-CAM
target layer (``gradcam_layer``) and our CNNs use ``nn.ReLU`` only, so the
attribution methods can hook them; a user's network is checked for the same
interface when the config loads (:func:`check_network`).
"""

from __future__ import annotations

import importlib
import inspect
import sys
from typing import Any, Literal

import torch
from pydantic import ConfigDict, Field, model_serializer, model_validator
from torch import nn

from study.params import Params
from study.storage import project_dir


class Architecture(Params):
    """A VGG-like 3D CNN: ``blocks`` x ([Conv3d + norm + ReLU] x ``convs_per_block``, MaxPool3d(2)), then a head.

    The defaults are the paper's MriNet: 3 blocks of Conv3d k3 without padding,
    BatchNorm, ReLU and max pooling, 32/64/128 channels and a linear layer on the
    flattened features; but no dropout before that layer, where the paper had 0.5:
    on weak effects dropout 0.5 kept the network from fitting its training subjects
    (README, "Weak effects"), and augmentation already regularizes. ``head='gap'``
    averages the last feature map globally first (fewer parameters, any grid; it
    loses where in the brain a feature is, and learned nothing on weak effects).
    """

    blocks: int = Field(3, ge=1)
    width: int = Field(32, ge=1)  # channels of the first block
    growth: float = Field(2.0, gt=0)  # channel factor from one block to the next
    kernel_size: int = Field(3, ge=1)
    convs_per_block: int = Field(1, ge=1)
    norm: Literal["batch", "instance", "group", "none"] = "batch"
    dropout: float = Field(0.0, ge=0, lt=1)  # the paper: 0.5
    head: Literal["flatten", "gap"] = "flatten"
    padding: int = Field(0, ge=0)

    def channels(self, block: int) -> int:
        """Output channels of ``block`` (0-based)."""
        return int(round(self.width * self.growth**block))

    def feature_shape(self, input_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The last block's output voxels per axis for inputs of ``input_shape``; 0 on an axis that runs out."""
        sizes = list(input_shape)
        for _ in range(self.blocks):
            for _ in range(self.convs_per_block):
                sizes = [max(s + 2 * self.padding - self.kernel_size + 1, 0) if s else 0 for s in sizes]
            sizes = [s // 2 for s in sizes]
        return tuple(sizes)  # type: ignore[return-value]


PRESETS: dict[str, Architecture] = {"mrinet": Architecture()}


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    return nn.Identity()


class BrainCNN(nn.Module):
    """The network of an :class:`Architecture` on a fixed input grid; logits [batch, 2] (class 0, class 1), or
    [batch, ``outputs``]: one for a regression target."""

    def __init__(self, architecture: Architecture, input_shape: tuple[int, int, int], outputs: int = 2):
        super().__init__()
        self.architecture, self.outputs = architecture, outputs
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        channels_in = 1
        for block in range(architecture.blocks):
            channels = architecture.channels(block)
            for _ in range(architecture.convs_per_block):
                layers += [
                    nn.Conv3d(channels_in, channels, architecture.kernel_size, padding=architecture.padding),
                    _norm(architecture.norm, channels),
                    nn.ReLU(),
                ]
                channels_in = channels
            layers.append(nn.MaxPool3d(2))
        self.features = nn.Sequential(*layers)
        self.gradcam_layer: nn.Module = layers[-2]  # the last block's activation, before pooling
        try:
            with torch.no_grad():
                feature_shape = self.features(torch.zeros(1, 1, *self.input_shape)).shape
        except RuntimeError as err:
            raise ValueError(f"input grid {self.input_shape} is too small for {architecture}: {err}") from None
        if min(feature_shape[2:]) < 1:
            raise ValueError(f"input grid {self.input_shape} is too small for {architecture.blocks} blocks")
        flat = channels_in if architecture.head == "gap" else int(torch.tensor(feature_shape[1:]).prod())
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool3d(1) if architecture.head == "gap" else nn.Identity(),
            nn.Flatten(),
            nn.Dropout(architecture.dropout),
            nn.Linear(flat, outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] (class 0, class 1, e.g. female, male) for volumes [batch, 1, D, H, W]."""
        return self.head(self.features(x))


class Network(Params):
    """A researcher's own network: ``class`` (``package.module:Name``), a ``torch.nn.Module`` subclass built as
    ``Name(**kwargs)``, with ``input_shape=(D, H, W)`` too when its constructor takes that argument.

    In the config, ``model: {class: mynets:ResNet3d, depth: 18}``: every key but
    ``class`` and ``gradcam_layer`` is a keyword argument, and a search can
    search them by name. The module must map volumes [batch, 1, D, H, W] to
    logits [batch, 2] (class 0, class 1). Grad-CAM weighs the output of its
    ``gradcam_layer``: the module the config's ``gradcam_layer`` names (a dotted
    submodule name, as MONAI's CAM takes it, e.g. ``class_layers.relu`` of
    MONAI's DenseNet), else the network's own ``gradcam_layer`` attribute;
    usually the last convolutional block's activation. Grad-CAM places its map
    by the convolutions and poolings met before that layer in module
    registration order, so register modules in the order they run (as
    ``nn.Sequential`` does). Guided Backpropagation needs ReLU activations
    only. The module is imported where the study runs: an installed package, or
    a ``.py`` file in the project directory. Importing it runs its code: a
    config, like a Python script, is something to trust before running it.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    factory: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")  # the config's `class`
    kwargs: dict[str, Any] = Field(default_factory=dict)
    gradcam_layer: str | None = Field(None, pattern=r"^[A-Za-z_0-9][\w.]*$")  # a submodule's dotted name

    @model_validator(mode="before")
    @classmethod
    def _from_config(cls, data: Any) -> Any:
        """``{class: NAME, **kwargs}`` as the config writes it."""
        if isinstance(data, dict) and "class" in data:
            reserved = ("class", "gradcam_layer")
            return {
                "factory": data["class"],
                "gradcam_layer": data.get("gradcam_layer"),
                "kwargs": {k: v for k, v in data.items() if k not in reserved},
            }
        return data

    @model_serializer
    def _to_config(self) -> dict[str, Any]:
        layer = {"gradcam_layer": self.gradcam_layer} if self.gradcam_layer else {}
        return {"class": self.factory, **layer, **self.kwargs}

    def import_factory(self) -> type[nn.Module]:
        """The ``torch.nn.Module`` subclass that ``class`` names (the project directory importable, as for Ray's
        workers). Anything else is refused: a function could do anything with the config's arguments."""
        module_name, _, name = self.factory.partition(":")
        if str(project_dir()) not in sys.path:
            sys.path.append(str(project_dir()))
        try:
            target: Any = importlib.import_module(module_name)
            for part in name.split("."):
                target = getattr(target, part)
        except Exception as err:  # noqa: BLE001 - a missing module, a name it lacks, an error inside it
            file = module_name.replace(".", "/") + ".py"
            raise ValueError(
                f"cannot import {self.factory}: {type(err).__name__}: {err}. Install its package, or "
                f"put {file} in the project directory ({project_dir()})"
            ) from None
        if not (isinstance(target, type) and issubclass(target, nn.Module)):
            raise ValueError(
                f"{self.factory} is a {type(target).__name__}, not a torch.nn.Module subclass: a study "
                "builds only network classes; name the network's class"
            )
        return target

    def takes_input_shape(self) -> bool:
        """Whether the constructor takes ``input_shape`` by name (ours do; MONAI's networks do not)."""
        return "input_shape" in inspect.signature(self.import_factory()).parameters

    def keyword_names(self) -> set[str] | None:
        """The keyword arguments the factory takes (those a search may set); None when it takes any."""
        signature = inspect.signature(self.import_factory())
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
            return None
        return {n for n, p in signature.parameters.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL} - {
            "input_shape"
        }


class UserNetwork(nn.Module):
    """A :class:`Network` built for an input grid, with the interface every stage uses."""

    def __init__(self, architecture: Network, input_shape: tuple[int, int, int]):
        super().__init__()
        self.architecture = architecture
        self.input_shape = tuple(input_shape)
        factory = architecture.import_factory()
        shape = {"input_shape": self.input_shape} if architecture.takes_input_shape() else {}
        try:
            self.net = factory(**shape, **architecture.kwargs)
        except Exception as err:  # noqa: BLE001 - whatever the constructor raises is reported with its arguments
            given = f"input_shape={self.input_shape} and " if shape else ""
            raise ValueError(
                f"{architecture.factory} cannot be built with {given}{architecture.kwargs}: {type(err).__name__}: {err}"
            ) from None
        self._find_gradcam_layer()  # checked now, with what to change

    def _find_gradcam_layer(self) -> nn.Module:
        """The module the config's ``gradcam_layer`` names, else the network's own attribute."""
        name, factory = self.architecture.gradcam_layer, self.architecture.factory
        if name is not None:
            try:
                return self.net.get_submodule(name)
            except AttributeError:
                children = ", ".join(n for n, _ in self.net.named_children())
                raise ValueError(
                    f"{factory} has no module {name!r} (gradcam_layer); its top-level modules: "
                    f"{children} (a dotted name reaches inside them, e.g. features.denseblock4)"
                ) from None
        layer = getattr(self.net, "gradcam_layer", None)
        if not isinstance(layer, nn.Module) or not any(m is layer for m in self.net.modules()):
            raise ValueError(
                f"{factory} builds a {type(self.net).__name__} without a gradcam_layer: name the module "
                "Grad-CAM should explain in the config (model.gradcam_layer: a dotted module name) or set "
                "self.gradcam_layer to it (one of the network's modules, e.g. the last convolutional "
                "block's ReLU)"
            )
        return layer

    @property
    def gradcam_layer(self) -> nn.Module:
        return self._find_gradcam_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, 2] (class 0, class 1) for volumes [batch, 1, D, H, W]."""
        return self.net(x)


def build_model(architecture: Architecture | Network, input_shape: tuple[int, int, int], outputs: int = 2) -> nn.Module:
    """The network of ``architecture`` for inputs of ``input_shape``: a :class:`BrainCNN` with ``outputs`` outputs
    (the target's: :attr:`study.data.cohort.Regression.outputs`), or a user's own (its outputs checked by
    :func:`check_network`)."""
    if isinstance(architecture, Network):
        return UserNetwork(architecture, input_shape)
    return BrainCNN(architecture, input_shape, outputs)


def architecture_of(data: dict[str, Any]) -> Architecture | Network:
    """An architecture from its ``model_dump()``: a :class:`Network` when it names a ``class``."""
    return Network.model_validate(data) if "class" in data else Architecture.model_validate(data)


def check_network(architecture: Network, input_shape: tuple[int, int, int], outputs: int = 2) -> UserNetwork:
    """Build the network and run one volume of the study grid through it; returns it (eval mode).

    It must give logits [1, 2] (``outputs``: [1, 1] for a regression target). Raises ValueError saying what to
    change. Whether the attribution methods can explain it is theirs to check
    (:func:`study.attribution.gradcam.check_placement`,
    :func:`study.attribution.guided_backprop.check_relu_only`).
    """
    model = UserNetwork(architecture, input_shape).eval()
    x = torch.zeros(1, 1, *input_shape)
    try:
        with torch.no_grad():
            logits = model(x)
    except Exception as err:  # noqa: BLE001 - whatever the network raises is reported with where it happened
        raise ValueError(
            f"{architecture.factory} fails on one volume of the study grid {tuple(input_shape)}: "
            f"{type(err).__name__}: {err}"
        ) from None
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (1, outputs):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        needs = (
            f"logits [batch, {outputs}] (class 0, class 1{', ...' if outputs > 2 else ''})"
            if outputs > 1
            else "[batch, 1] (the predicted value)"
        )
        raise ValueError(f"{architecture.factory} returns {got} for one volume; this study needs {needs}")
    return model


def model_record(model: BrainCNN | UserNetwork, weights: dict[str, torch.Tensor] | None = None) -> dict:
    """What rebuilds a model: weights (``model``'s own unless given), architecture and input grid shape.

    Plain tensors and builtins only, so a saved record loads with
    ``torch.load(weights_only=True)`` (no pickle of code; a user's network is
    rebuilt from its ``class`` and keyword arguments).
    """
    return {
        "model": model.state_dict() if weights is None else weights,
        "arch": model.architecture.model_dump(mode="json"),
        "input_shape": model.input_shape,
        "outputs": getattr(model, "outputs", 2),
    }


def model_from_record(record: dict) -> BrainCNN | UserNetwork:
    """The model of a :func:`model_record`, in eval mode, on the device of its weights."""
    model = build_model(architecture_of(record["arch"]), tuple(record["input_shape"]), record.get("outputs", 2))
    model.load_state_dict(record["model"])
    return model.eval()
