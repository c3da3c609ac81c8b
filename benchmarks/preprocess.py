"""Preprocessing and synthesis speed: subjects per second on 1 core vs all cores.

Writes a synthetic cohort at 1 mm (the size of real T1w images), then builds
the 2 mm preprocessing cache once with a 1-CPU Ray and once with an N-CPU Ray,
and prints both rates and their ratio (ideal: N). Also times `study synth` of
200 subjects at 2 mm.

    python benchmarks/preprocess.py --subjects 24
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import ray

from study.data.cache import build_cache
from study.data.cohort import CohortConfig, load_cohort
from study.data.synth import SyntheticCohort, synthesize_cohort
from study.data.volumes import Grid
from study.runtime import start_ray


def preprocess_rate(root: Path, cache_dir: Path, cpus: int) -> float:
    ray.shutdown()
    start_ray(cpus)
    cohort = load_cohort(CohortConfig(root=root))
    start = time.perf_counter()
    build = build_cache(cohort, Grid.mni(2.0), cache_dir)
    assert len(build.computed) == len(cohort.subjects)
    return len(cohort.subjects) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subjects", type=int, default=24)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start_ray(args.cpus)
        start = time.perf_counter()
        synthesize_cohort(tmp / "synth2mm", SyntheticCohort(subjects=200, voxel_size=2.0))
        print(f"synth: 200 subjects at 2 mm in {time.perf_counter() - start:.1f} s on {args.cpus} CPUs")
        synthesize_cohort(tmp / "cohort", SyntheticCohort(subjects=args.subjects, voxel_size=1.0))
        one = preprocess_rate(tmp / "cohort", tmp / "cache1", 1)
        many = preprocess_rate(tmp / "cohort", tmp / "cacheN", args.cpus)
    print(
        f"preprocess 1 mm -> 2 mm: 1 CPU {one:.2f} subjects/s, {args.cpus} CPUs {many:.2f} subjects/s, "
        f"speed-up {many / one:.2f}x (ideal {args.cpus}x)"
    )


if __name__ == "__main__":
    main()
