"""What runs differently on a GPU, checked on the CPU: numbers the study reports stay float32 under bf16
autocast, no TF32 where float32 is promised, GPU tasks give their GPU back, no two DDP ranks on one GPU, no
host sync or blocking copy in a training step, sanity checks explained in attribution batches from host-drawn
weights, and the GPU's memory asked of a GPU task."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from study.attribution.perturbation import gaussian_blur3d
from study.config import ResourcesConfig, parse_config
from study.config.sections import TrainConfig
from study.data.cohort import CohortConfig, load_cohort
from study.errors import ConfigError
from study.runtime import Precision
from study.training.crossval import predict_task
from study.training.loop import TrainingData, predict_log_odds
from study.training.models import Architecture, BrainCNN
from study.training.phase import Phase
from tests.conftest import cache_for


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
    fp32 = predict_log_odds(model, data, 4, Precision(torch.device("cpu"), bf16=False, channels_last=False))
    bf16 = predict_log_odds(model, data, 4, Precision(torch.device("cpu"), bf16=True, channels_last=False))
    np.testing.assert_allclose(bf16, fp32, atol=1e-5)  # in bf16 they differ by up to about 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(data.x[:2]).dtype == torch.bfloat16  # what predict must not report


def test_exact_turns_off_autocast_inside_one_and_tf32_then_restores_both():
    precision = Precision(torch.device("cpu"), bf16=True, channels_last=False)
    tf32 = torch.backends.cudnn.allow_tf32
    matmul = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # as a user's network module may (TF32 matrix products)
    try:
        with precision.autocast():
            assert torch.is_autocast_enabled("cpu")
            with precision.exact():
                assert not torch.is_autocast_enabled("cpu") and not torch.backends.cudnn.allow_tf32
                assert torch.get_float32_matmul_precision() == "highest"
                assert torch.nn.Linear(3, 2)(torch.ones(1, 3)).dtype == torch.float32
            assert torch.is_autocast_enabled("cpu")
        assert torch.backends.cudnn.allow_tf32 == tf32
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(matmul)


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
        parse_config(
            {
                "name": "s",
                "cohort": {"root": "x"},
                "resources": {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5},
            }
        )
    assert parse_config(
        {"name": "s", "cohort": {"root": "x"}, "resources": {"use_gpu": True, "num_workers": 1, "gpus_per_worker": 0.5}}
    )


def test_an_epoch_reads_its_loss_and_accuracy_from_the_device_once_not_at_every_step(
    cohort_dir, preprocess_config, monkeypatch
):
    """On a GPU each ``.item()`` waits for the step's kernels: the host could not read the next batch meanwhile."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache = cache_for(cohort, preprocess_config).cache
    ids, labels = list(cohort.ids), cohort.labels
    data = TrainingData(cache, ids, labels, [], labels[:0])
    train = TrainConfig(batch_size=4, epochs=1)
    reads, seen = [], []
    item = torch.Tensor.item

    def counted(tensor: torch.Tensor) -> float:  # the phase's own reads (AdamW reads its step counts on the host)
        if sys._getframe(1).f_code.co_filename.endswith("phase.py"):
            reads.append(tuple(tensor.shape))
        return item(tensor)

    def one_epoch(_: dict) -> None:  # in this process: Ray Train's local mode (no workers)
        phase = Phase(
            Architecture(width=4, blocks=2), train, data.cache, ids, labels, 1, Precision.choose(torch.device("cpu"))
        )
        monkeypatch.setattr(torch.Tensor, "item", counted)
        metrics, subjects = phase.epoch(0)
        monkeypatch.undo()
        seen.append((metrics, subjects))

    TorchTrainer(one_epoch, scaling_config=ScalingConfig(num_workers=0)).fit()
    ((metrics, subjects),) = seen
    assert sorted(subjects) == sorted(ids) and len(ids) > 2 * train.batch_size  # three steps at least
    assert reads == [(), ()]  # the summed loss and the count of correct subjects, once each
    correct = metrics["train_accuracy"] * len(ids)
    assert correct == pytest.approx(round(correct)) and 0 <= correct <= len(ids)
    assert 0 < metrics["train_loss"] < 5


def test_maps_are_the_float32_maps_when_training_runs_in_bf16():
    """Under bf16 autocast a Meaningful Perturbations mask moved by up to half its maximum: not a study's number."""
    from study.attribution import Perturbation
    from study.attribution.actors import Explanation, explain_batch

    shape = (20, 24, 20)
    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=4, blocks=2), shape).eval()
    x = Volumes(2, shape).x
    labels = torch.tensor([0, 1])
    explanation = Explanation(
        ("gradcam", "guided_backprop", "perturbation"),
        "true_class",
        Perturbation(iterations=5),
        np.zeros(shape, dtype=np.float32),
    )
    cpu = torch.device("cpu")
    fp32 = explain_batch(model, x, labels, explanation, 6.0, Precision(cpu, bf16=False, channels_last=False))
    bf16 = explain_batch(model, x, labels, explanation, 6.0, Precision(cpu, bf16=True, channels_last=False))
    for method, maps in fp32.items():
        np.testing.assert_array_equal(bf16[method], maps, err_msg=method)


def test_augmentation_copies_its_draws_to_the_device_without_waiting_for_it():
    """A blocking copy to a GPU waits for every step queued before it: each draw goes non-blocking."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from study.training.augment import Augmentation, augment

    class BlockingCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (
                func is torch.ops.aten._to_copy.default
                and args[0].device.type == "cpu"
                and kwargs.get("device") not in (None, torch.device("cpu"))
                and not kwargs.get("non_blocking")
            ):
                self.seen.append(str(func))
            return func(*args, **kwargs)

    x = torch.empty(4, 1, 10, 12, 10, device="meta")  # a device that is not the host, with no data
    with BlockingCopies() as mode:
        out = augment(x, Augmentation(flip_lr=True), 2.0, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.device == x.device
    assert mode.seen == []


def test_a_left_right_flip_mirrors_the_flipped_subjects_only():
    from study.training.augment import Augmentation, augment

    x = torch.rand(8, 1, 6, 8, 6, generator=torch.Generator().manual_seed(2)) + 0.5
    still = Augmentation(rotation_deg=0, translation_mm=0, scaling=0, intensity=0, flip_lr=True)
    out = augment(x, still, 2.0, torch.Generator().manual_seed(0))
    flipped = torch.tensor([torch.allclose(o, v.flip(1), atol=1e-5) for o, v in zip(out, x)])
    kept = torch.tensor([torch.allclose(o, v, atol=1e-5) for o, v in zip(out, x)])
    assert (flipped ^ kept).all() and flipped.any() and kept.any()


def test_fp32_training_steps_run_without_tf32_forward_and_backward(cohort_dir, preprocess_config):
    """``train.precision: fp32`` promised float32; on a GPU cuDNN's convolutions default to TF32 (10-bit mantissa)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    cohort = load_cohort(CohortConfig(root=cohort_dir))
    ids, labels = list(cohort.ids), cohort.labels
    data = TrainingData(cache_for(cohort, preprocess_config).cache, ids, labels, [], labels[:0])
    flags: list[tuple[str, bool]] = []

    def one_epoch(_: dict) -> None:
        precision = Precision.choose(torch.device("cpu"), "fp32")
        phase = Phase(
            Architecture(width=4, blocks=2), TrainConfig(batch_size=6, epochs=1), data.cache, ids, labels, 1, precision
        )
        conv = next(m for m in phase.bare.modules() if isinstance(m, torch.nn.Conv3d))
        conv.register_forward_hook(lambda *_: flags.append(("forward", torch.backends.cudnn.allow_tf32)))
        conv.register_full_backward_hook(lambda *_: flags.append(("backward", torch.backends.cudnn.allow_tf32)))
        phase.epoch(0)

    assert torch.backends.cudnn.allow_tf32  # PyTorch's default, which a GPU's training used
    TorchTrainer(one_epoch, scaling_config=ScalingConfig(num_workers=0)).fit()
    assert {"forward", "backward"} == {what for what, _ in flags}
    assert not any(tf32 for _, tf32 in flags)


def test_sanity_re_explanations_run_in_attribution_batches(cohort_dir, preprocess_config):
    """The randomized models' maps of all sanity subjects were one batch, past what the memory check allowed."""
    from study.attribution import Perturbation
    from study.attribution.actors import Explanation, explain_subjects

    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache = cache_for(cohort, preprocess_config).cache
    ids, labels = list(cohort.ids)[:5], cohort.labels[:5]
    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=4, blocks=2), cache.shape).eval()
    batches: list[int] = []
    model.register_forward_pre_hook(lambda _m, inputs: batches.append(len(inputs[0])))
    explanation = Explanation(
        ("gradcam", "guided_backprop", "perturbation"), "true_class", Perturbation(iterations=3, reference="blur")
    )
    precision = Precision.choose(torch.device("cpu"))
    chunked = explain_subjects(model, cache, ids, labels, explanation, precision, batch_size=2)
    assert batches and max(batches) == 2
    batches.clear()
    whole = explain_subjects(model, cache, ids, labels, explanation, precision, batch_size=len(ids))
    assert max(batches) == len(ids)
    for method, maps in whole.items():
        assert chunked[method].shape == (len(ids), *cache.shape)
        np.testing.assert_allclose(
            chunked[method].astype(np.float32), maps.astype(np.float32), atol=2e-3, err_msg=method
        )


def test_the_cascade_randomizes_on_the_host_from_its_own_seed():
    """On a GPU ``reset_parameters`` drew from CUDA's generator: other weights than a CPU run of the same seed."""
    from study.attribution.sanity import cascade_steps, randomized_cascade

    torch.manual_seed(0)
    model = BrainCNN(Architecture(width=4, blocks=2), (20, 24, 20)).eval()
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    def weights(draw_between: bool) -> list[dict[str, torch.Tensor]]:
        steps = []
        for _, randomized in randomized_cascade(model, seed=3):
            steps.append({k: v.clone() for k, v in randomized.state_dict().items()})
            assert all(p.device.type == "cpu" for p in randomized.parameters()) and not randomized.training
            if draw_between:
                torch.rand(1000)  # e.g. a method's own draws: they must not change the next step's weights
        return steps

    first, second = weights(False), weights(True)
    assert len(first) == len(cascade_steps(model)) >= 3
    for a, b in zip(first, second):
        assert all(torch.equal(a[k], b[k]) for k in a)
    for key, value in model.state_dict().items():  # the trained model is left as it was
        assert torch.equal(value, trained[key])
    changed = [[k for k in step if not torch.equal(step[k], trained[k])] for step in first]
    assert all(len(a) < len(b) for a, b in zip(changed, changed[1:]))  # each step randomizes more layers


@pytest.mark.slow
def test_the_gpu_memory_is_unknown_when_no_gpu_comes_in_time():
    """Asked of a one-GPU task, not of the driver's GPU 0; on a Ray without a free GPU it gives up, cancelled."""
    import time

    import ray

    from study.runtime import gpu_memory

    assert ray.cluster_resources().get("GPU", 0) == 0  # the tests' Ray: CPUs only
    started = time.monotonic()
    assert gpu_memory(timeout_s=2) is None
    assert time.monotonic() - started < 30
    from ray.util.state import list_tasks

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        waiting = [
            t
            for t in list_tasks(filters=[("func_or_class_name", "=", "_gpu_memory")])
            if t.state not in ("FINISHED", "FAILED")
        ]
        if not waiting:
            break
        time.sleep(1)
    assert not waiting  # the task is cancelled, not left waiting for a GPU
