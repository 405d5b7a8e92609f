#!/usr/bin/env bash
# Run here (a machine with PyPI), in the repository root, before lending a GPU machine any time: downloads the
# wheels that the GPU image lacks, for its Python 3.12, into .whl/ (git-ignored through .git/info/exclude).
# Versions are the ones dpokit's CPU tests run with; the image's own torch (CUDA) is used as it is.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    transformers==5.24.0 accelerate==1.15.0 peft==0.21.2 trl==1.16.0 datasets==5.2.0 dill==0.4.1 \
    multiprocess==0.70.19 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types typing-inspection \
    vaderSentiment
du -sh .whl
