"""What runs differently on a GPU, checked on the CPU: numbers the study reports stay float32 under bf16
autocast, no TF32 where float32 is promised, GPU tasks give their GPU back, no two DDP ranks on one GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study.attribution.perturbation import gaussian_blur3d
from study.config import ConfigError, ResourcesConfig, parse_config
from study.runtime import Precision
from study.training.crossval import predict_task
from study.training.loop import predict
from study.training.models import Architecture, BrainCNN


class Volumes(torch.utils.data.Dataset):
    """Random volumes in the shape CachedVolumes gives them (whole batches through __getitems__)."""

    def __init__(self, n: int, shape: tuple[int, int, int]):
        self.x = torch.randn(n, 1, *shape, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.x)

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[indices], torch.zeros(len(indices), dtype=torch.int64)


def test_test_probabilities_are_float32_when_training_runs_in_bf16():
    shape = (20, 24, 20)
    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=4, blocks=2), shape).eval()
    data = Volumes(12, shape)
    fp32 = predict(model, data, 4, Precision(torch.device("cpu"), bf16=False, channels_last=False))
    bf16 = predict(model, data, 4, Precision(torch.device("cpu"), bf16=True, channels_last=False))
    np.testing.assert_allclose(bf16, fp32, atol=1e-6)  # in bf16 they differ by up to about 0.01
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(data.x[:2]).dtype == torch.bfloat16  # what predict must not report


def test_exact_turns_off_autocast_inside_one_and_tf32_then_restores_both():
    precision = Precision(torch.device("cpu"), bf16=True, channels_last=False)
    tf32 = torch.backends.cudnn.allow_tf32
    with precision.autocast():
        assert torch.is_autocast_enabled("cpu")
        with precision.exact():
            assert not torch.is_autocast_enabled("cpu") and not torch.backends.cudnn.allow_tf32
            assert torch.nn.Linear(3, 2)(torch.ones(1, 3)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")
    assert torch.backends.cudnn.allow_tf32 == tf32


def test_the_blurred_reference_is_float32_under_autocast():
    x = torch.rand(2, 1, 12, 14, 12, generator=torch.Generator().manual_seed(1))
    plain = gaussian_blur3d(x, 1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        blurred = gaussian_blur3d(x, 1.5)
    assert blurred.dtype == torch.float32
    torch.testing.assert_close(blurred, plain)


def test_a_gpu_test_task_ends_its_process_and_a_cpu_one_is_reused():
    assert predict_task(ResourcesConfig(use_gpu=True, gpus_per_worker=0.5))._default_options["max_calls"] == 1
    assert predict_task(ResourcesConfig())._default_options.get("max_calls", 0) == 0


def test_two_ddp_ranks_may_not_share_a_gpu():
    with pytest.raises(ConfigError, match="Ray may put two DDP ranks on one GPU"):
        parse_config({"name": "s", "cohort": {"root": "x"},
                      "resources": {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5}})
    assert parse_config({"name": "s", "cohort": {"root": "x"},
                         "resources": {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.5}})
