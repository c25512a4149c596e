#!/usr/bin/env bash
# On a GPU / TPU machine (README, "On an accelerator"): the compiled Pallas kernels against their references on
# the real chip, then the kernel benchmark. Runs from the repository root with no install (PYTHONPATH=.), so a
# machine whose JAX is newer than the pin works as it is; about 8 minutes on an H200.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=.
status=0
timeout 240 python -m pytest -x -q tests/pallas_kernels -k "pallas_gpu or pallas_tpu" || status=$?
timeout 300 python -m experiments.bench_kernels --workdir="${1:-workdir/bench_kernels}" || status=$?
exit "$status"
