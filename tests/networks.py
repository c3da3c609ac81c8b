"""Networks of a researcher's own, as `model.class` names them (tests.networks:TinyNet)."""

from __future__ import annotations

from torch import nn


class TinyNet(nn.Module):
    """Two padded convolutions, global average pooling and a linear head: any grid, two logits.

    ``blind`` multiplies the features by zero: logits that ignore the volume, as
    of a training that collapsed to the class prior.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        channels: int = 4,
        activation: str = "relu",
        gradcam: bool = True,
        outputs: int = 2,
        blind: bool = False,
    ):
        super().__init__()
        self.blind = blind
        act = {"relu": nn.ReLU, "elu": nn.ELU}[activation]
        self.features = nn.Sequential(
            nn.Conv3d(1, channels, 3, padding=1),
            act(),
            nn.MaxPool3d(2),
            nn.Conv3d(channels, 2 * channels, 3, padding=1),
            act(),
        )
        if gradcam:
            self.gradcam_layer = self.features[-1]
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2 * channels, outputs))

    def forward(self, x):
        features = self.features(x)
        return self.head(features * 0 if self.blind else features)


class ShortcutNet(nn.Module):
    """A residual block whose strided shortcut is registered before the path it runs beside."""

    def __init__(self, input_shape: tuple[int, int, int], shortcut_first: bool = True):
        super().__init__()
        if shortcut_first:
            self.shortcut = nn.Conv3d(1, 4, 1, stride=2)
        self.main = nn.Sequential(nn.Conv3d(1, 4, 3, stride=2, padding=1), nn.ReLU())
        if not shortcut_first:
            self.shortcut = nn.Conv3d(1, 4, 1, stride=2)
        self.gradcam_layer = self.main[-1]
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))

    def forward(self, x):
        return self.head(self.main(x) + self.shortcut(x))


class FailsInOneRun(TinyNet):
    """TinyNet whose training fails in the Ray Train run named ``fails_in`` (``fold1``: that fold fails)."""

    def __init__(self, input_shape: tuple[int, int, int], fails_in: str = "fold1"):
        super().__init__(input_shape)
        self.fails_in = fails_in

    def forward(self, x):
        if self.training and _train_run_name() == self.fails_in:
            raise RuntimeError(f"{self.fails_in} fails, as the test asks")
        return super().forward(x)


def _train_run_name() -> str | None:
    """The name of the Ray Train run this process trains in; None outside a training worker."""
    import ray.train

    try:
        return ray.train.get_context().get_experiment_name()
    except Exception:  # not a training worker (the config check builds the network in the driver)
        return None
