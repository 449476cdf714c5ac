#!/usr/bin/env bash
# The whole test suite (the README's test command) on the torch releases the package supports,
# each with the Triton its wheel pins, without a GPU: for each version a virtual environment of
# its own (no packages shared with this Python), `pip install torch==VERSION` (PyPI's Linux
# wheel, a CUDA build that also runs on a CPU: about 5 GB each with its nvidia-* packages), the
# package with its test extras, then `python -m pytest -q tests`.
#
#   bash bench/torch_versions.sh [VERSION ...]     # default: 2.7.1 (the oldest supported) 2.11.0
#   PYTHON=python3.10 bash bench/torch_versions.sh 2.13.0     # another Python (the package: >= 3.10)
#
# numpy comes as pip picks it (2.4 and newer refuse what Triton 3.3-3.6's interpreter asks of it,
# which sasa_triton._library.fix_interpreter_index mends). About 10-12 minutes per version on 2
# cores once its environment exists (kept under ${VENVS:-/tmp/sasa_triton_venvs}).
set -uo pipefail
cd "$(dirname "$0")/.."
VENVS="${VENVS:-/tmp/sasa_triton_venvs}"
PYTHON="${PYTHON:-python}"
py="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')" || exit 1
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(2.7.1 2.11.0)
status=0
for version in "${versions[@]}"; do
  venv="$VENVS/torch-$version-py$py"
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -m venv "$venv" && "$venv/bin/pip" install -q "torch==$version" \
      && "$venv/bin/pip" install -q -e ".[dev]" \
      || { echo "== torch $version: could not install"; status=1; continue; }
  fi
  echo "== $("$venv/bin/python" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)')"
  # (the whole log next to the environment: a failure's message is above the summary)
  "$venv/bin/python" -m pytest -q -rf -p no:cacheprovider tests > "$venv.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$venv.log" | tail -8
  echo "   (log: $venv.log)"
done
exit $status
