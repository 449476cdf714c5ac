#!/usr/bin/env bash
# The GPU checks this project still owes, as one script for a lent machine (H100/H200, torch and
# Triton preinstalled): correctness first, then timing. Logs go under $OUT (default ./gpu_out).
#
#   bash bench/gpu_session.sh [correctness|timing|all]
#
# correctness (~6 min on an H100): the whole test suite (not only -m gpu) with configs pinned
#   (tests/conftest.py sets SASA_TRITON_AUTOTUNE=0 and a private cache), then every autotune
#   candidate of the local and stem kernels against the default config (bench/sweep_candidates.py).
# timing (~6 min): the README's main command, the host path per op call with real launches, and
#   Nsight Compute's SpeedOfLight/Occupancy of the three local kernels at 56x56x64 and 7x7x512.
# Record every figure in bench/RESULTS.md with the card, date, command and commit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
what="${1:-all}"
# The lent machines reach no package index: run from the checkout (pytest must be there already,
# e.g. carried in a virtual environment; the correctness part needs it).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  date -u; git rev-parse --short HEAD 2>/dev/null
  python -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())"
} >"$OUT/env.txt" 2>&1

if [[ "$what" == correctness || "$what" == all ]]; then
  python -m pytest -q -x -p no:cacheprovider -n 8 tests --ignore tests/test_notebooks.py >"$OUT/pytest.log" 2>&1 \
    || python -m pytest -q -p no:cacheprovider tests --ignore tests/test_notebooks.py >"$OUT/pytest.log" 2>&1
  tail -n 30 "$OUT/pytest.log"
  timeout 300 python bench/sweep_candidates.py --out "$OUT/sweep" >"$OUT/sweep.log" 2>&1
  tail -n 5 "$OUT/sweep.log"
fi

if [[ "$what" == timing || "$what" == all ]]; then
  ( time timeout 420 python -m sasa_triton.bench --out "$OUT/bench" ) >"$OUT/bench.log" 2>&1
  tail -n 40 "$OUT/bench.log"
  python -m sasa_triton.bench_host --gpu --shape 32 7 7 8 64 --calls 500 >"$OUT/host.log" 2>&1
  cat "$OUT/host.log"
  if command -v ncu >/dev/null; then
    for shape in "32 56 56 8 8" "32 7 7 8 64"; do
      ncu --section SpeedOfLight --section Occupancy -k regex:_local_attn -c 3 \
        python -m sasa_triton.bench_host --gpu --shape $shape --calls 1 >"$OUT/ncu_${shape// /x}.txt" 2>&1
    done
  fi
fi
