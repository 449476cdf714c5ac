#!/usr/bin/env bash
# The checks that hold per Triton release, run on several without a GPU: for each version, a
# virtual environment on top of this Python's packages (torch and the test tools come from there)
# with only triton replaced, then
#   - bench/launch_overhead.py --check: the direct launches pass a compiled kernel's launcher what
#     Triton's own launch passes (a version that passes may join
#     sasa_triton._library.DIRECT_LAUNCH_TRITONS; off the list, launches go through Triton's run);
#   - the sm_90 static tests: every kernel compiles for an H100, spills no more than
#     tests/helpers.py KNOWN_SPILLS allows that version, and executes no more instructions than
#     tests/instruction_baseline.json holds for it (a version without an entry skips that test:
#     `python -m sasa_triton.inspect --write-instruction-baseline` by its Python adds one).
#
#   bash bench/triton_versions.sh [VERSION ...]     # default: 3.3.1 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 3.9.0
#
# Needs a package index (pip install triton==VERSION) and about 1.5 minutes per version on 2
# cores once each environment exists (kept under ${VENVS:-/tmp/sasa_triton_venvs}).
set -uo pipefail
cd "$(dirname "$0")/.."
VENVS="${VENVS:-/tmp/sasa_triton_venvs}"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(3.3.1 3.4.0 3.5.1 3.6.0 3.7.1 3.8.0 3.9.0)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0
for version in "${versions[@]}"; do
  venv="$VENVS/triton-$version"
  if [ ! -x "$venv/bin/python" ]; then
    python -m venv --system-site-packages "$venv" && "$venv/bin/pip" install -q --no-deps "triton==$version" \
      || { echo "== triton $version: could not install"; status=1; continue; }
  fi
  echo "== triton $("$venv/bin/python" -c 'import triton; print(triton.__version__)')"
  env -u TRITON_INTERPRET "$venv/bin/python" bench/launch_overhead.py --check | tail -1 || status=1
  "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_compile_sm90.py tests/test_inspect.py \
    tests/test_launch.py tests/test_attention_stem.py::test_kernels_compile_for_sm90_without_spills -rfs \
    | tail -4 || status=1
done
exit $status
