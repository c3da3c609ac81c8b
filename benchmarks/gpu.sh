#!/usr/bin/env bash
# Issue 17's GPU figures in one device run (under 10 minutes), the most telling first.
#
# Here, once per session: bash benchmarks/gpu_bundle.sh. Then as the device `run` command, carrying .gpu:
#   mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/gpu.sh
#
# Each step writes $OUT/<step>.log (it comes back with the run) and is cut at its limit, so a slow step leaves
# the later ones their time:
#   smoke     a 40-subject study with the GPU (fractional GPUs for two folds and for the attribution actors):
#             the study's GPU path, run end to end; when it fails, read this log first
#   agreement the same model's maps of 4 subjects on the CPU and on the GPU (Spearman, max difference): every
#             map is float32 on both, so they may differ by rounding order only
#   training  pure compute: MriNet at the paper's width and grid, batch 8 (the study's default) and 32
#   group     the permutation test at the paper's size (1,113 subjects, 5,000 permutations), CPU and GPU
#   study     the paper's cohort and folds (1,113 subjects, 10 folds, 300 perturbation iterations), 5 epochs
#             instead of 40 and 4 folds at once: the stage table, real path against pure compute, Ray Train
#             set-up per fold (a fixed cost: scale training by 8 for the paper's 40 epochs, not the set-up)
# With a GPU machine of several minutes more, run the study step alone with the paper's 40 epochs.
#
# The whole script ends within GPU_SECONDS (default 540) of its start, whatever a step does: a step gets
# the smaller of its own limit and what is left (less 10 s to hand the logs back), so the device call
# (600 s at most, the bundle's unpacking included) never times out with the logs lost.
set -u
out=${OUT:-gpu-logs}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
budget=${GPU_SECONDS:-540}
step() {  # step NAME SECONDS COMMAND...: run COMMAND for at most SECONDS, its output to the console and the log
    local name=$1 limit=$2
    shift 2
    local left=$((budget - SECONDS - 10))
    if ((left < 20)); then
        echo "== $name: skipped, $left s of the $budget s budget left" | tee "$out/$name.log"
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $name (at most $limit s): $*"
    local started=$SECONDS
    timeout -k 5 "$limit" "$@" > >(tee "$out/$name.log") 2>&1
    echo "== $name: exit $? after $((SECONDS - started)) s"
    # A step cut at its limit leaves its Ray running. Every Ray process goes: a device machine runs nothing else.
    pkill -9 -f "/tmp/site/ray/|^ray::" 2>/dev/null
    sleep 1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/device.txt"
git log --oneline -1 2>/dev/null | tee -a "$out/device.txt"
step smoke 150 python3 benchmarks/whole_study.py --subjects 40 --folds 2 --epochs 2 --width 8 --voxel-size 6 \
    --iterations 10 --permutations 100 --cohort /tmp/bench_cohort
step agreement 60 python3 benchmarks/agreement.py --iterations 30
for batch in 8 32; do
    step "training_batch$batch" 45 python3 benchmarks/training.py --grids 58x70x58 --batch "$batch" --steps 20
done
step group 50 python3 benchmarks/group_test.py
step study 255 python3 benchmarks/whole_study.py --subjects 1113 --folds 10 --epochs 5 --concurrent-folds 4 \
    --cohort /tmp/bench_cohort
