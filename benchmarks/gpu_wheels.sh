#!/usr/bin/env bash
# Wheels the GPU machine lacks, downloaded here into .whl/ (git-ignored) for the device run to
# carry: diffusers, the peer of benchmarks/bench_sampler.py, and importlib_metadata, its one
# requirement that machine's image does not hold (everything else diffusers needs is there); and
# setuptools as pyproject.toml's build backend asks for it (>= 68), so the offline editable
# install of fastddpm does not depend on the image's own version.
# gpu_suite.sh installs whatever lies in .whl/ before it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 -d .whl "diffusers==0.42.1" "importlib_metadata" \
  "setuptools>=68,<82"  # torch asks for < 82
ls -l .whl
