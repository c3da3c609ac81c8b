#!/usr/bin/env bash
# Build .gpu/site.tar.xz: what the GPU machine (CPython 3.12 with torch, numpy, pandas, scipy, scikit-learn,
# matplotlib ... but no Ray, MLflow, Optuna or NiBabel) lacks to run a whole study, small enough to travel.
#
#   bash benchmarks/gpu_bundle.sh     # here, once per session (.gpu is git-ignored); carry .gpu in each device run
#
# ../shared/tools/gpu-bundle bundles Ray, mlflow-skinny, Optuna and NiBabel. A study also needs MLflow's SQL
# store (full mlflow: SQLAlchemy, Alembic), nilearn (the MNI152 template and mask), scikit-image (SSIM) and
# pydantic: with them the bundle is 74 MB, over the 64 MiB that may travel. What no study touches is dropped:
# MLflow's web UI (27 MB of JavaScript), the packages' test suites and scikit-image's sample images.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# The versions this checkout's tests ran with (its .venv), so the device runs what CI ran, not what PyPI
# holds that day; without a .venv, the project's ranges.
pinned=()
if [[ -x .venv/bin/python ]]; then
    mapfile -t pinned < <(.venv/bin/python -c 'from importlib.metadata import version
for p in ("mlflow", "mlflow-skinny", "optuna", "nibabel", "nilearn", "scikit-image", "pydantic"):
    print(f"{p}=={version(p)}")')
else
    pinned=("mlflow>=3,<4" "nilearn>=0.11" "scikit-image>=0.22" "pydantic>=2.6")
fi
echo "bundling ${pinned[*]}"
bash ../shared/tools/gpu-bundle "$work/bundle" "${pinned[@]}"
mkdir "$work/site"
tar -xJf "$work/bundle/site.tar.xz" -C "$work/site"
rm -rf "$work"/site/mlflow/server/js "$work"/site/skimage/data/*.{png,jpg,tif,npz,npy}
find "$work/site" -depth -type d \( -name tests -o -name __pycache__ \) -exec rm -rf {} +
mkdir -p .gpu
tar -C "$work/site" -cf - . | xz -T0 -6 > .gpu/site.tar.xz
ls -la .gpu/site.tar.xz
