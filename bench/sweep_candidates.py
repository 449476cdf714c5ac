"""Run every autotune candidate of every local and stem kernel against the default config (a GPU check).

    python bench/sweep_candidates.py --out sweep_out                   # bf16, ResNet-50 stages + stem
    python bench/sweep_candidates.py --out sweep_out --dtypes bf16 fp16 fp32 --kernel-sizes 7 11
    python bench/sweep_candidates.py --out sweep_out --isolate         # a fresh process per candidate

Keys: local_fwd, local_bwd_dq and local_bwd_dkdv at the four ResNet-50 stages (batch 32,
56x56x64, 28x28x128, 14x14x256, 7x7x512, 8 heads) per window size (default k = 7), and the stem
kernels spatial_{block,sliding}_{fwd,bwd_dq,bwd_dkdv} at 224x224 (4 heads of 16, 4x4 blocks).
For each, every candidate of sasa_triton.tuning.candidate_configs, spilling ones included (this
looks for wrong answers, not speed), is run as the tuner validates it (sasa_triton.autotune: fresh
seeded inputs, NaN-poisoned outputs, both paddings, per-element and RMS tolerance against the
default config's outputs) in a child process: a candidate that faults or kills it is recorded
and the sweep goes on in a fresh child. Nothing is timed.

Writes <out>/sweep.json (every candidate: status, reason, errors, registers and spills) and
<out>/sweep.md (the non-accepted ones per key), and prints the summary line
"N configs, M mismatches, F faults, E errors, K keys failed". Exit status 1 when any candidate
mismatched or faulted or a key failed. Under TRITON_INTERPRET=1 (no GPU) it runs tiny shapes so
CI can check the flow.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from sasa_triton import autotune, tuning
from sasa_triton._utils import interpreter_enabled

STEM_WINDOWS = ("block", "sliding")


def build_parser(prog=None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Validate every autotune candidate against the "
                                                            "default config, each key in a child process.")
    parser.add_argument("--out", required=True, help="folder for sweep.json and sweep.md")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(autotune.DTYPES), default=None,
                        help="default bf16 (fp32 under the interpreter)")
    parser.add_argument("--kernel-sizes", type=int, nargs="+", default=None,
                        help=f"local windows (default {autotune.PAPER_KERNEL_SIZE})")
    parser.add_argument("--batch", type=int, default=32, help="batch of the shapes (default 32)")
    parser.add_argument("--kernels", nargs="+", default=None,
                        help="only these kernels (e.g. local_bwd_dq spatial_sliding_fwd)")
    parser.add_argument("--max-candidates", type=int, default=None,
                        help="at most this many configs per key, the default included (default all)")
    parser.add_argument("--no-stem", action="store_true", help="skip the stem kernels")
    parser.add_argument("--isolate", action="store_true", help="a fresh child process for every candidate")
    parser.add_argument("--timeout", type=float, default=autotune.SILENCE_TIMEOUT_S,
                        help="seconds a child may stay silent before it is killed (its candidate: a fault)")
    return parser


def sweep_tasks(args, interpret: bool) -> list:
    dtypes = args.dtypes or (["fp32"] if interpret else ["bf16"])
    sizes = args.kernel_sizes or [autotune.TINY_KERNEL_SIZE if interpret else autotune.PAPER_KERNEL_SIZE]
    batch = 1 if interpret else args.batch
    local = autotune.TINY_LOCAL if interpret else autotune.PAPER_LOCAL
    stem = autotune.TINY_STEM if interpret else autotune.PAPER_STEM
    tasks = [autotune.Task(kernel, k, 1, (batch, *shape), dtype, max_candidates=args.max_candidates)
             for dtype in dtypes for shape in local for k in sizes for kernel in autotune.LOCAL_KERNELS]
    if not args.no_stem:
        tasks += [autotune.Task(kernel, autotune.STEM_BLOCK, 1, (batch, *stem), dtype,
                                max_candidates=args.max_candidates)
                  for dtype in dtypes for window in STEM_WINDOWS for kernel in autotune.stem_kernels(window)]
    if args.kernels:
        tasks = [t for t in tasks if t.kernel in args.kernels]
    return tasks


def summarize(results) -> dict:
    """Counts over the non-default candidates, and the failed keys."""
    counts = {"configs": 0, "accepted": 0, "mismatch": 0, "fault": 0, "error": 0, "pruned": 0}
    for result in results:
        for index, r in result.results.items():
            if index != 0:
                counts["configs"] += 1
                counts[r["status"]] += 1
    counts["keys_failed"] = sum(r.error is not None for r in results)
    return counts


def summary_line(counts: dict) -> str:
    return (f"{counts['configs']} configs, {counts['mismatch']} mismatches, {counts['fault']} faults, "
            f"{counts['error']} errors, {counts['keys_failed']} keys failed")


def write_reports(results, out: str, command: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    counts = summarize(results)
    meta = {"gpu": tuning.device_name(), "triton": tuning.triton_version(), "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    data = {**meta, "summary": counts, "keys": [
        {"key": r.key, "shape": list(r.task.shape), "error": r.error,
         "candidates": [{"config": r.configs[i], **r.results[i]} for i in sorted(r.results)]}
        for r in results]}
    json_path, md_path = os.path.join(out, "sweep.json"), os.path.join(out, "sweep.md")
    with open(json_path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")
    lines = [f"# Autotune candidate sweep: {meta['gpu']}, Triton {meta['triton']}, {meta['date']}", "",
             f"`{command}`", "", f"**{summary_line(counts)}**", ""]
    for r in results:
        bad = [(i, r.results[i]) for i in sorted(r.results) if r.results[i]["status"] != "accepted"]
        status = f"failed: {r.error.splitlines()[0]}" if r.error else f"{len(r.results) - len(bad)} of {len(r.results)} accepted"
        lines.append(f"## {r.key} (B={r.task.shape[0]} {r.task.shape[1]}x{r.task.shape[2]}): {status}")
        if bad:
            lines += ["", "| config | status | reason |", "|---|---|---|"]
            lines += [f"| `{json.dumps(r.configs[i])}` | {res['status']} | {res['reason']} |" for i, res in bad]
        lines.append("")
    with open(md_path, "w") as f:
        f.write("\n".join(lines))
    return json_path, md_path


def main(argv=None, prog=None) -> int:
    args = build_parser(prog).parse_args(argv)
    interpret = interpreter_enabled()
    import torch
    if not interpret and not torch.cuda.is_available():
        print("sweep_candidates: no CUDA GPU (set TRITON_INTERPRET=1 to check the flow on the CPU)", file=sys.stderr)
        return 2
    tasks = sweep_tasks(args, interpret)
    results = autotune.tune(tasks, time_candidates=False, prune=False, timeout=args.timeout,
                            candidates_per_child=1 if args.isolate else None)
    command = " ".join(["python bench/sweep_candidates.py", *(argv if argv is not None else sys.argv[1:])])
    json_path, md_path = write_reports(results, args.out, command)
    counts = summarize(results)
    print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    print(summary_line(counts))
    return 1 if counts["mismatch"] or counts["fault"] or counts["keys_failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
