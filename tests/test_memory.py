"""The memory a study will need, estimated before it starts: checked against what a CPU run allocates."""

from __future__ import annotations

import pytest
import torch

from study.memory import GIB, estimate_memory, memory_problems, saved_activation_bytes
from study.training.models import Architecture, Network, build_model

GRID = (23, 27, 23)  # the tests' 8 mm grid


def kept_by_a_cpu_pass(model: torch.nn.Module, batch: int) -> int:
    """What autograd really keeps (bytes) in one float32 training pass on the CPU, with the logits."""
    kept = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model.train()(torch.randn(batch, 1, *GRID))
    logits.sum().backward()
    return kept + logits.numel() * logits.element_size()


@pytest.mark.parametrize(
    "architecture",
    [
        Architecture(width=4),
        Architecture(width=8, blocks=3, norm="instance"),
        Network.model_validate({"class": "tests.networks:TinyNet"}),
    ],
)
def test_the_meta_device_count_is_what_a_cpu_pass_keeps(architecture):
    model = build_model(architecture, GRID)
    for batch in (1, 3):
        assert saved_activation_bytes(model, GRID, batch) == kept_by_a_cpu_pass(model, batch)
    assert next(model.parameters()).device.type == "cpu"  # the model itself is left as it was


def test_a_study_that_cannot_fit_is_refused_with_the_keys_to_lower():
    model = build_model(Architecture(width=8), (91, 109, 91))  # the paper's 2 mm grid
    needs = estimate_memory(
        model,
        (91, 109, 91),
        batch_size=8,
        attribution_batch=8,
        methods=5,
        subjects=1113,
        brain_voxels=230_000,
        on_gpu=True,
        gpus_per_actor=0.25,
    )
    assert 1 * GIB < needs.training < 8 * GIB and needs.actors_per_device == 4
    assert needs.analysis == 1113 * 230_000 * (4 * 5 + 16)
    assert memory_problems(needs, host_bytes=128 * GIB, device_bytes=80 * GIB) == []
    small = memory_problems(needs, host_bytes=8 * GIB, device_bytes=2 * GIB)
    assert len(small) == 3
    assert "preprocess.voxel_size" in small[0] and "lower train.batch_size or model.width" in small[1]
    assert "lower attribution.batch_size, or raise attribution.gpus_per_actor" in small[2]
    assert memory_problems(needs, host_bytes=128 * GIB, device_bytes=None) == []  # no local GPU: not checked
