"""The preprocessing cache: correct voxels, reuse, invalidation, no loss on failure."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from study.attribution.store import MapStore
from study.data.cache import CachedVolumes, VolumeCache, collate, params_key
from study.data.cohort import CohortConfig, load_cohort
from study.data.volumes import preprocess_volume
from study.storage import replace_atomically
from tests.conftest import cache_for


def test_cache_holds_preprocessed_volumes(cohort_dir, preprocess_config):
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    build = cache_for(cohort, preprocess_config)
    assert build.problems == [] and build.computed == sorted(cohort.ids)
    cache = build.cache
    assert cache.subject_ids == cohort.ids and cache.volumes.dtype == np.float16
    assert cache.volumes.shape == (12, 23, 27, 23)
    expected = preprocess_volume(cohort.subjects[5].image, preprocess_config.grid)
    np.testing.assert_array_equal(cache.volumes[5], expected)
    brain = expected != 0
    assert abs(float(expected[brain].astype(np.float32).mean())) < 0.01  # z-scored inside the brain
    assert np.isclose(cache.affine[0, 0], 8.0) and cache.affine[0, 3] < 0  # RAS, MNI-centred
    np.testing.assert_allclose(cache.mean_volume(), np.asarray(cache.volumes, np.float64).mean(0), atol=1e-6)


def test_cache_is_reused_and_invalidated_per_subject(cohort_dir, preprocess_config):
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    first = cache_for(cohort, preprocess_config).cache
    before = np.array(first.volumes)
    again = cache_for(cohort, preprocess_config)
    assert again.computed == [] and again.cache.path == first.path

    image = cohort.subjects[2].image
    img = nib.load(image)
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image((data * (1 + (data > np.median(data[data > 0])))).astype(np.int16), img.affine), image)
    os.utime(image, ns=(1, 1))  # make sure the mtime differs
    # A study still running on the first cache (another process) keeps it; the next new build removes it.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from study.storage import hold_shared; "
            f"hold_shared({str(first.path)!r}); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "held"
    changed = cache_for(load_cohort(CohortConfig(root=cohort_dir)), preprocess_config)
    assert changed.computed == [cohort.subjects[2].subject_id]
    assert first.path.exists() and np.array_equal(first.volumes, before)  # in use: kept as it was
    np.testing.assert_array_equal(changed.cache.volumes[3], before[3])
    assert not np.array_equal(changed.cache.volumes[2], before[2])
    holder.communicate("", timeout=60)
    os.utime(image, ns=(2, 2))
    cache_for(load_cohort(CohortConfig(root=cohort_dir)), preprocess_config)
    assert not first.path.exists() and not changed.cache.path.exists()  # superseded ones go once nobody uses them

    # An index file read back names the volumes it deletes only through its own name: a forged one deletes nothing else.
    kept = cache_for(load_cohort(CohortConfig(root=cohort_dir)), preprocess_config).cache.path
    victim = cohort_dir / "participants.tsv"
    (kept.parent / "index-0000forged.json").write_text(json.dumps({"volumes": str(victim), "source_keys": []}))
    os.utime(image, ns=(3, 3))
    cache_for(load_cohort(CohortConfig(root=cohort_dir)), preprocess_config)
    assert victim.exists() and not (kept.parent / "index-0000forged.json").exists()

    finer = preprocess_config.model_copy(update={"voxel_size": 6.0})
    other = cache_for(load_cohort(CohortConfig(root=cohort_dir)), finer)
    assert other.cache.volumes.shape[1:] == (30, 36, 30) and len(other.computed) == 12


def test_failed_subjects_lose_nothing_already_computed(cohort_dir, preprocess_config):
    cohort = load_cohort(CohortConfig(root=cohort_dir))
    good = cohort.subjects[4].image.read_bytes()
    cohort.subjects[4].image.write_bytes(good[:100])
    build = cache_for(cohort, preprocess_config)
    assert [p.subject for p in build.problems] == ["0005"]
    assert "sub-0005_T1w.nii.gz" in build.problems[0].file
    assert len(build.cache.subject_ids) == 11 and "0005" not in build.cache.subject_ids

    cohort.subjects[4].image.write_bytes(good)  # the researcher fixes the file
    fixed = cache_for(load_cohort(CohortConfig(root=cohort_dir)), preprocess_config)
    assert fixed.problems == [] and fixed.computed == ["0005"]
    assert not list((preprocess_config.cache_dir).glob("*/staging/*.npy"))
    assert not list((preprocess_config.cache_dir).glob("*/*.tmp*"))


def test_dataset_reads_whole_batches(cohort_dir, preprocess_config):
    import torch

    cohort = load_cohort(CohortConfig(root=cohort_dir))
    cache = cache_for(cohort, preprocess_config).cache
    ids = cohort.ids[::-1][:5]
    dataset = CachedVolumes(cache, ids, cohort.labels[::-1][:5])
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate)
    x, y = next(iter(loader))
    assert x.shape == (3, 1, 23, 27, 23) and x.dtype == torch.float32
    assert y.tolist() == cohort.labels[::-1][:3].tolist()
    np.testing.assert_array_equal(x[1, 0].numpy(), cache.volumes[cache.rows([ids[1]])[0]].astype(np.float32))


def test_a_node_without_the_cache_says_which_node_and_why(tmp_path):
    cache = VolumeCache(tmp_path / "elsewhere" / "volumes.f16", ["sub-01"], (4, 4, 4), np.eye(4))
    with pytest.raises(FileNotFoundError, match=rf"not on node {socket.gethostname()}: .*shared file system"):
        _ = cache.volumes


def test_a_full_disk_leaves_no_half_written_cache_or_map(tmp_path):
    # A real failing write: a file-size limit (EFBIG, as ENOSPC would be) on a process that writes a map store
    # and a cache-sized file through replace_atomically.
    script = """
import resource, signal, sys
from pathlib import Path
import numpy as np
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
from study.attribution.store import MapStore
from study.storage import replace_atomically
out = Path(sys.argv[1])
for write in (lambda: MapStore(out / "maps", [f"{i:04d}" for i in range(12)], (20, 20, 20), ["gradcam"]),
              lambda: replace_atomically(out / "subject.npy", lambda tmp: np.save(tmp, np.ones(50_000)))):
    try:
        write()
        print("written")
    except OSError as err:
        print("failed", err.errno)
"""
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120)
    # The map store's memmap fails with EFBIG; numpy's save, a short write without errno, names its file.
    assert result.stdout.split("\n")[:2] == [f"failed {errno.EFBIG}", "failed None"], (
        result.stdout + result.stderr[-2000:]
    )
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["maps"]  # nothing half-written
    # With room again, the same store starts whole: every subject still to explain.
    store = MapStore(tmp_path / "maps", [f"{i:04d}" for i in range(12)], (20, 20, 20), ["gradcam"])
    assert store.missing(["0000", "0011"]) == ["0000", "0011"]


def test_a_full_disk_during_a_study_is_one_line_that_says_what_to_do(tmp_path):
    import ray.exceptions

    from study.commands import write_failure

    def write(tmp: Path) -> None:  # half a file written, then a real ENOSPC
        tmp.write_text('{"fold": 0, ')
        with open("/dev/full", "w") as f:
            f.write("x")

    with pytest.raises(OSError) as full:
        replace_atomically(tmp_path / "fold0.json", write)
    assert list(tmp_path.iterdir()) == []  # neither the fold nor its half-written temporary file
    for err in (full.value, ray.exceptions.RayTaskError("preprocess", "traceback", full.value)):
        message = str(write_failure(err, "study run demo.yaml"))
        assert message.startswith(f"could not write {tmp_path / 'fold0.json'}: No space left on device. Free"), message
        assert message.endswith("Resume with: study run demo.yaml")
    assert write_failure(ValueError("a bug"), "study run demo.yaml") is None  # not hidden as a disk problem


def test_two_studies_building_one_cache_together_compute_each_subject_once(cohort_dir, preprocess_config):
    """Two `study run`s started together on one cohort: the second waits for the first's build and reuses it."""
    script = (
        "import json, sys; from pathlib import Path; from study.data.cache import build_cache; "
        "from study.data.cohort import CohortConfig, load_cohort; from study.config import PreprocessConfig; "
        "from study.tasks import map_in_process; "
        f"p = PreprocessConfig(voxel_size={preprocess_config.voxel_size}, "
        f"cache_dir={str(preprocess_config.cache_dir)!r}); "
        f"b = build_cache(load_cohort(CohortConfig(root=Path({str(cohort_dir)!r}))), p.grid, p.cache_dir, "
        "tasks=map_in_process); "
        "print(json.dumps({'computed': len(b.computed), 'subjects': len(b.cache.subject_ids)}))"
    )
    directory = preprocess_config.cache_dir / params_key(preprocess_config.grid, preprocess_config.normalize)
    directory.mkdir(parents=True)
    with open(directory / ".build.lock", "w") as held:  # both start while a build holds the folder
        fcntl.flock(held, fcntl.LOCK_EX)
        runs = [
            subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        for run in runs:
            line = run.stdout.readline()
            assert "is being written by another study; waiting for it" in line, (line, run.stderr.read()[-2000:])
        fcntl.flock(held, fcntl.LOCK_UN)
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err[-2000:] for _, err in outputs]
    results = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outputs), key=lambda r: r["computed"])
    assert results == [{"computed": 0, "subjects": 12}, {"computed": 12, "subjects": 12}]  # one built, one reused
    assert len(list(directory.glob("index-*.json"))) == 1


def test_a_corrected_table_gives_each_subject_its_own_image_again(tmp_path, cohort_dir, preprocess_config):
    """A column-layout table maps A to X and B to Y; corrected to B -> X, A -> Y (same rows, ids swapped), the
    cache must follow the table. Before, it served A's old image: the cohort key hashed the images only."""
    images = sorted(cohort_dir.glob("sub-*/anat/*_T1w.nii.gz"))[:4]
    table = tmp_path / "subjects.tsv"

    def cohort_of(ids: list[str]):
        rows = [f"{sid}\t{'M' if i % 2 else 'F'}\tf{sid}\t{image}" for i, (sid, image) in enumerate(zip(ids, images))]
        table.write_text("participant_id\tsex\tfamily_id\tpath\n" + "\n".join(rows) + "\n")
        return load_cohort(CohortConfig(root=cohort_dir, participants=table, path_column="path"))

    first = cache_for(cohort_of(["A", "B", "C", "D"]), preprocess_config).cache
    assert np.array_equal(first.volumes[first.rows(["A"])[0]], preprocess_volume(images[0], preprocess_config.grid))
    corrected = cache_for(cohort_of(["B", "A", "C", "D"]), preprocess_config)
    assert corrected.computed == []  # every image was preprocessed before: rows are reused by image
    cache = corrected.cache
    for sid, image in (("A", images[1]), ("B", images[0])):
        np.testing.assert_array_equal(
            cache.volumes[cache.rows([sid])[0]], preprocess_volume(image, preprocess_config.grid)
        )
