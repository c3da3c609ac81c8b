"""The memory estimate of a training worker against what one CPU training step really takes.

For each config, a fresh process builds the config's network, runs one float32
training step (forward, backward, AdamW) on a batch of random volumes of the
study grid, and reports its peak resident memory above what it held before the
step; beside it, ``study.memory``'s estimate (without the CUDA context, as on a
CPU). Run on demand:

    python benchmarks/memory.py tune_configs/demo.yaml tune_configs/paper.yaml
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

STEP = """
import json, resource, sys, torch
from study.config import load_config
from study.training.models import build_model
config = load_config(sys.argv[1])
shape = config.preprocess.grid.shape
model = build_model(config.model, shape).train()
optimizer = torch.optim.AdamW(model.parameters())
x = torch.randn(config.train.batch_size, 1, *shape)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long)).backward()
optimizer.step()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"measured": (peak - before) * 1024}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+")
    args = parser.parse_args()
    from study.config import load_config
    from study.memory import GIB, estimate_memory
    from study.training.models import build_model

    print(f"{'config':<28} {'grid':<14} {'batch':>5} {'estimate GiB':>12} {'measured GiB':>12} {'ratio':>6}")
    for path in args.configs:
        config = load_config(path)
        shape = config.preprocess.grid.shape
        needs = estimate_memory(
            build_model(config.model, shape), shape, config.train.batch_size, None, 1, 1, 1, on_gpu=False
        )
        out = subprocess.run([sys.executable, "-c", STEP, path], capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["measured"]
        print(
            f"{path:<28} {'x'.join(map(str, shape)):<14} {config.train.batch_size:>5} "
            f"{needs.training / GIB:>12.2f} {measured / GIB:>12.2f} {measured / needs.training:>6.2f}"
        )
    print(f"(this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB peak)")


if __name__ == "__main__":
    main()
