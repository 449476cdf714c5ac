#!/usr/bin/env bash
# The whole test suite (the README's test command) on the torch releases the package supports,
# each with the Triton its wheel pins, without a GPU: for each version a virtual environment of
# its own (no packages shared with this Python), `pip install torch==VERSION` (PyPI's Linux
# wheel, a CUDA build that also runs on a CPU: about 5 GB each with its nvidia-* packages), the
# package with its test extras, then `python -m pytest -q tests`.
#
#   bash bench/torch_versions.sh [VERSION ...]     # default: 2.7.1 (the oldest supported) 2.11.0
#
# numpy stays below 2.3 there: Triton 3.3's interpreter converts one-element arrays to Python ints,
# which newer numpy refuses (every interpreted stem kernel then fails: an environment of torch
# 2.7's day had numpy 2.2). About 10-15 minutes per version on 2 cores once its environment exists
# (kept under ${VENVS:-/tmp/sasa_triton_venvs}).
set -uo pipefail
cd "$(dirname "$0")/.."
VENVS="${VENVS:-/tmp/sasa_triton_venvs}"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.7.1 2.11.0)
status=0
for version in "${versions[@]}"; do
  venv="$VENVS/torch-$version"
  if [ ! -x "$venv/bin/python" ]; then
    python -m venv "$venv" && "$venv/bin/pip" install -q "torch==$version" "numpy<2.3" \
      && "$venv/bin/pip" install -q -e ".[dev]" "numpy<2.3" \
      || { echo "== torch $version: could not install"; status=1; continue; }
  fi
  echo "== $("$venv/bin/python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)')"
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests | tail -3 || status=1
done
exit $status
