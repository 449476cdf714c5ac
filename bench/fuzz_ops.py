"""Randomized checks of the Triton ops against their float64 references, beyond the suite's grids.

    python bench/fuzz_ops.py [--op local|stem|all] [--seed N] [--cases N] [--device cpu|cuda]

Each case draws its shapes and options at random: for `local_attention2d`, batch, image (1-12 a
side), heads, head dim (1-33), window (1-15), dilation (1-3), padding, tables (none, shared, per
head), dtype and scale, through the public op (autograd; q, k, v sometimes the parts of one
packed tensor) or through the launchers at a random autotuning candidate of each kernel; for the
stem, `spatial_attention2d` and `attention_stem2d` with blocks of 1-5, both windows and paddings,
1-4 mixtures and channels_last images. y and every gradient are compared with float64 by the
tests' own helpers (tests/helpers.py):
- within the suite's per-element bound of PyTorch's own error in the dtype on the same inputs
  (assert_close_to_reference) or, where that fails and the case's line says so, within
  flash-attention's tests' looser bound (largest and RMS error at most 3x PyTorch's,
  assert_max_error_within): sums that cancel, such as the table gradients, have heavy-tailed
  errors, PyTorch's too, which may be small at the element where the kernel's is large;
- the local op's fp32 relaxed to 1e-4 relative (the backward's p = exp2(s - lse),
  flash-attention style, loses about |lse| ulps where PyTorch's fp32 softmax loses one);
- the stem ops also within the suite's relative RMS, unless PyTorch's own result misses that too
  (the mixture softmax's gradient cancels: PyTorch's own fp32 emb_row erred by 4.5e-5 at seed
  31, case 37; the case's line says so);
- a gradient that is zero in exact arithmetic (a 1 x 1 window, a one-key block, the row taps of
  a one-row image with mask padding) is rounding noise in every implementation: at most 3x
  PyTorch's largest error in the dtype plus 64 ulps of y's scale (as the suite's check_results).
Without CUDA the kernels run under Triton's interpreter (set here), in fp32 and fp16; on CUDA,
compiled, bf16 too. Each case prints a line; exit status 1 if any failed. Run from the
repository root.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def local_case(rng, index, seed, device, dtypes, info):
    import torch

    import sasa_triton
    import test_local_attention as t
    from helpers import assert_max_error_within, zero_in_exact_arithmetic
    from sasa_triton import tuning
    from sasa_triton.ops.local_attention import config_space

    k = rng.choice([1, 3, 3, 5, 7, 7, 9, 11, 13, 15])
    dilation = rng.choice([1, 1, 1, 2, 3])
    H, W, heads, B = rng.randint(1, 12), rng.randint(1, 12), rng.randint(1, 3), rng.randint(1, 2)
    D = rng.choice([1, 2, 3, 4, 5, 8, 9, 16, 17, 24, 32, 33])
    padding = rng.choice(["zeros", "mask"])
    rel = rng.choice(["shared", "per_head", None]) if D >= 2 else None
    dtype, scale = rng.choice(dtypes), rng.choice([0.5, 1.0, 0.125, 2.0])
    mode = rng.choice(["public", "public", "candidate"])
    label = f"local {mode} B{B} H{H} W{W} h{heads} D{D} k{k} d{dilation} {padding} {rel} {dtype} s{scale}"
    info["label"] = label
    inputs, dy = t.make_inputs(B, H, W, heads, D, k, rel, device, dtype, seed=seed * 1000 + index)
    options = dict(kernel_size=k, dilation=dilation, scale=scale, padding=padding)
    if mode == "public":
        if rng.random() < 0.3:  # q, k, v as the parts of one (B, H, W, 3, heads, D) tensor
            inputs = [*torch.stack(inputs[:3], dim=3).unbind(3), *inputs[3:]]
            label += " packed"
            info["label"] = label
        results = t.results_by_autograd(sasa_triton.local_attention2d, inputs, dy, backend="triton", **options)
    else:
        configs = {name: rng.choice(list(config_space(name, k, dilation, D, dtype, tuning.next_power_of_2(H),
                                                      tuning.next_power_of_2(W)))) for name in t.KERNELS}
        label += f" {configs}"
        info["label"] = label
        results = t.results_of_launchers(inputs, dy, configs, k, dilation, scale, padding)
    # fp32 at 1e-4 relative: the backward's p = exp2(s - lse) loses about |lse| ulps.
    relaxed = dict(atol_units=2000, rms_atol_units=2000) if dtype == torch.float32 else {}
    exact, in_dtype = t.references(inputs, dy, **options)
    try:
        t.check_results(results, exact, in_dtype, dtype, **relaxed)
    except AssertionError as error:
        # Beyond the suite's per-element bound: within flash-attention's tests' bound, said so?
        y_scale = exact["y"].abs().max().item()
        for name in exact:
            if name == "y" or not zero_in_exact_arithmetic(exact[name], y_scale):
                assert_max_error_within(results[name], exact[name], in_dtype[name], dtype, name, **relaxed)
        info["label"] += f" (per element: {str(error).strip()[:90]}...; within the largest-error bound)"


def stem_case(rng, index, seed, device, dtypes, info):
    import torch

    import test_attention_stem as stem_tests
    import test_spatial_attention as spatial_tests
    from helpers import (assert_close, assert_close_to_reference, assert_max_error_within, assert_rounding_noise,
                         zero_in_exact_arithmetic)

    dtype, block_size = rng.choice(dtypes), rng.choice([1, 2, 3, 4, 5])
    window, padding = rng.choice(["block", "sliding"]), rng.choice(["zeros", "mask"])
    H, W, B, scale = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 2), rng.choice([0.3, 0.8, 1.5])
    if rng.random() < 0.5:
        heads, D, M = rng.randint(1, 3), rng.choice([1, 2, 3, 5, 8, 16, 17]), rng.randint(1, 4)
        label = f"spatial B{B} H{H} W{W} h{heads} D{D} M{M} bs{block_size} {window} {padding} {dtype} s{scale}"
        info["label"] = label
        out, expected, grads, expected_grads, lowp = spatial_tests.run_both(
            (B, H, W, heads, D, M, block_size, window, padding), device, dtype, rng.choice([None, torch.float32]),
            scale=scale)
        names = spatial_tests.GRAD_NAMES
    else:
        heads, D, C_in, M = rng.choice([1, 2, 4]), rng.choice([1, 2, 4, 8]), rng.choice([1, 3, 4]), rng.randint(1, 4)
        channels_last = rng.random() < 0.3
        label = (f"stem B{B} C_in{C_in} H{H} W{W} C_out{heads * D} h{heads} M{M} bs{block_size} {window} {padding} "
                 f"{dtype} s{scale}{' channels_last' if channels_last else ''}")
        info["label"] = label
        inputs = stem_tests.make_inputs(B, C_in, H, W, heads * D, M, block_size, dtype, channels_last=channels_last,
                                        seed=seed * 1000 + index)
        out, expected, grads, expected_grads, lowp = stem_tests.run_both(inputs, heads, block_size, window,
                                                                         padding, dtype, device, scale=scale)
        names = stem_tests.GRAD_NAMES
    # Every element within the suite's bound of PyTorch's own error in the dtype on the same inputs
    # (lowp), and the suite's relative RMS bound unless that is where PyTorch's own error lies too
    # (a gradient through the mixture softmax cancels: an fp32 emb_row at 4.5e-5 relative RMS).
    y_scale = expected.detach().abs().max().item()
    for name, got, exact, theirs in zip(["y", *names], [out, *grads], [expected, *expected_grads],
                                        [lowp[0], *lowp[1]]):
        if name != "y" and zero_in_exact_arithmetic(exact, y_scale):
            assert_rounding_noise(got, exact, dtype, y_scale, name, theirs)
            continue
        try:
            assert_close_to_reference(got, exact, theirs, dtype, name)
        except AssertionError as error:
            assert_max_error_within(got, exact, theirs, dtype, name)
            info["label"] += f" (per element: {str(error).strip()[:90]}...; within the largest-error bound)"
        try:
            assert_close(got, exact, dtype, name)
        except AssertionError as error:
            try:
                assert_close(theirs, exact, dtype, name)
            except AssertionError:  # PyTorch's own result misses the fixed bound too
                info["label"] += f" ({name} beyond the relative RMS bound, as PyTorch's own {str(dtype)[6:]})"
                continue
            raise error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--op", choices=["local", "stem", "all"], default="all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cases", type=int, default=40)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args(argv)
    # As the tests pin them (tests/conftest.py): the default configs, no tuned file, TF32 off.
    os.environ["SASA_TRITON_AUTOTUNE"] = "0"
    os.environ.setdefault("SASA_TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="sasa_triton_fuzz_"))
    os.environ.pop("SASA_TRITON_CONFIG_FILE", None)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter must be on before triton is imported: run again in a child.
        import subprocess
        env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
        return subprocess.call([sys.executable, os.path.abspath(__file__), *(argv or sys.argv[1:])], env=env)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    sys.path.insert(0, ROOT)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # The interpreter mishandles bf16 (the ops compute it in fp32 there): fp32 and fp16 on the CPU.
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if args.device == "cuda" else [])
    rng = random.Random(args.seed)
    cases = {"local": [local_case], "stem": [stem_case], "all": [local_case, stem_case]}[args.op]
    failed, start = 0, time.time()
    for index in range(args.cases):
        case = rng.choice(cases)
        case_rng, info = random.Random(rng.random()), {"label": case.__name__}
        try:
            case(case_rng, index, args.seed, args.device, dtypes, info)
            print(f"ok   {index} {info['label']}", flush=True)
        except Exception as error:  # a failed case is reported and the run goes on
            failed += 1
            print(f"FAIL {index} {info['label']}: {type(error).__name__}: {str(error)[:1500]}", flush=True)
    print(f"seed {args.seed}: {args.cases - failed} of {args.cases} cases within bounds, {failed} failed "
          f"({time.time() - start:.0f} s, {args.device})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
