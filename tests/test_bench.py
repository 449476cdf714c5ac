"""The benchmark harness (`python -m sasa_triton.bench`) and its FlexAttention baseline."""
import csv
import os
import warnings

import pytest
import torch

from sasa_triton import bench
from sasa_triton._bench_flex import flex_available, flex_local_attention2d
from sasa_triton._bench_plot import load_csv, roofs
from sasa_triton.reference import local_attention2d as reference_op

HAS_CUDA = torch.cuda.is_available()


def test_quick_cpu_run_writes_csv_table_and_plots(tmp_path, capsys):
    out = tmp_path / "bench"
    # --quick on a trimmed grid (one stage, one k, ResNet-26 at 32x32) to keep the test short.
    argv = ["--quick", "--device", "cpu", "--out", str(out), "--stages", "4", "--kernel-sizes", "3",
            "--image-size", "32", "--batch", "2"]
    assert bench.main(argv) == 0
    printed = capsys.readouterr().out
    assert bench.CPU_LABEL in printed, "a CPU run must say it is not the GPU numbers"

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.FIELDS
        raw = list(reader)
    rows = load_csv(out / "results.csv")
    assert len(rows) == len(raw) > 0
    timed = {(r["section"], r["provider"], r["pass"]) for r in rows if r["ms_median"] is not None}
    for provider in ("sasa_layer", "conv3x3", "conv_kxk", "dwconv_kxk", "reference"):
        for pass_ in ("fwd", "fwd+bwd"):
            assert ("layer", provider, pass_) in timed, f"{provider} {pass_} was not timed"
    for model in ("resnet26", "sasa_resnet26(conv stem)"):
        for pass_ in ("inference", "training"):
            assert ("model", model, pass_) in timed, f"{model} {pass_} was not timed"
    # Providers that cannot run on a CPU are kept as one row with the reason.
    skipped = {r["provider"]: r["note"] for r in rows if r["section"] == "layer" and r["ms_median"] is None}
    assert set(skipped) == {"sasa", "flex"} and all(skipped.values())
    for r in rows:
        if r["section"] == "layer" and r["ms_median"] is not None:
            assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
            assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["gbps"] > 0 and r["roofline_frac"] > 0
            assert r["device"] == "cpu" and r["peak_mem_mb"] is None  # no peak memory on a CPU
    bandwidth, matmul = roofs(rows)
    assert bandwidth > 0 and matmul > 0

    table = (out / "table.txt").read_text()
    assert bench.CPU_LABEL in table and "conv3x3" in table and "sasa_layer" in table
    for png in ("layer_throughput.png", "speedup_vs_conv.png", "roofline.png", "models.png"):
        assert (out / png).stat().st_size > 1000, png


def test_cpu_defaults_are_small():
    args = bench.parse_args(["--quick"])
    bench._resolve_defaults(args, torch.device("cpu"))
    assert (args.batch, args.stages, args.kernel_sizes, args.dtype) == (1, [3, 4], [3, 7], "fp32")
    args = bench.parse_args([])
    bench._resolve_defaults(args, torch.device("cuda"))
    assert (args.batch, args.stages, args.kernel_sizes, args.dtype) == (32, [1, 2, 3, 4], [3, 5, 7, 9, 11], "bf16")
    with pytest.raises(SystemExit):
        bench.parse_args(["--kernel-sizes", "4"])


def test_flop_and_byte_counts():
    B, H, W, C, k = 2, 14, 14, 256, 7
    # The paper's count (sasa_triton.models.flops): 2 * B*H*W*C * (2k^2 + k).
    assert bench.op_flops(B, H, W, C, k) == 2 * B * H * W * C * (2 * k * k + k)
    act = B * H * W * C * 2
    assert bench.cost("sasa", B, H, W, C, k, 2, backward=False) == (bench.op_flops(B, H, W, C, k), 4 * act)
    assert bench.cost("sasa", B, H, W, C, k, 2, backward=True) == (3 * bench.op_flops(B, H, W, C, k), 12 * act)
    flops, nbytes = bench.cost("conv3x3", B, H, W, C, k, 2, backward=False)
    assert flops == 2 * B * H * W * C * C * 9 and nbytes == 2 * act + 9 * C * C * 2
    assert bench.cost("dwconv_kxk", B, H, W, C, k, 2, backward=False)[0] == 2 * B * H * W * C * k * k


FLEX_CASES = [
    pytest.param(dict(B=2, H=9, W=11, heads=2, D=8, k=5, dilation=1, padding="zeros", per_head=False, scale=1.0),
                 id="B2-H9-W11-h2-D8-k5-d1-zeros"),
    pytest.param(dict(B=1, H=8, W=7, heads=2, D=6, k=3, dilation=2, padding="mask", per_head=True, scale=0.5),
                 id="B1-H8-W7-h2-D6-k3-d2-mask-perhead"),
]


def _flex_inputs(case, device, dtype=torch.float32, requires_grad=False):
    g = torch.Generator().manual_seed(0)
    shape = (case["B"], case["H"], case["W"], case["heads"], case["D"])
    q, k, v = (torch.randn(*shape, generator=g).to(device, dtype).requires_grad_(requires_grad) for _ in range(3))
    lead = (case["heads"],) if case["per_head"] else ()
    D = case["D"]
    rel_rows = (torch.randn(*lead, case["k"], D // 2, generator=g) * 0.5).to(device).requires_grad_(requires_grad)
    rel_cols = (torch.randn(*lead, case["k"], D - D // 2, generator=g) * 0.5).to(device).requires_grad_(requires_grad)
    return q, k, v, rel_rows, rel_cols


@pytest.mark.skipif(not flex_available(), reason="torch has no flex_attention")
@pytest.mark.parametrize("case", FLEX_CASES)
@pytest.mark.parametrize("with_rel", [True, False], ids=["rel", "norel"])
def test_flex_matches_reference_cpu_forward(case, with_rel):
    # Eager flex on a CPU: forward only (torch has no CPU flex backward), unfused but exact.
    q, k, v, rel_rows, rel_cols = _flex_inputs(case, "cpu")
    if not with_rel:
        rel_rows = rel_cols = None
    args = dict(kernel_size=case["k"], dilation=case["dilation"], scale=case["scale"], padding=case["padding"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y = flex_local_attention2d(q, k, v, rel_rows, rel_cols, min_head_dim=16, **args)
    expected = reference_op(q.double(), k.double(), v.double(),
                            None if rel_rows is None else rel_rows.double(),
                            None if rel_cols is None else rel_cols.double(), **args)
    assert y.shape == expected.shape
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not flex_available(), reason="torch has no flex_attention")
@pytest.mark.parametrize("case", FLEX_CASES[:1])
def test_flex_matches_reference_gpu_compiled_fwd_bwd(case):
    from sasa_triton._bench_flex import window_block_mask

    inputs = _flex_inputs(case, "cuda", requires_grad=True)
    args = dict(kernel_size=case["k"], dilation=case["dilation"], scale=case["scale"], padding=case["padding"])
    block_mask = window_block_mask(case["H"], case["W"], case["k"], case["dilation"], case["padding"], "cuda")
    fn = torch.compile(lambda *t: flex_local_attention2d(*t, block_mask=block_mask, min_head_dim=16, **args))
    y = fn(*inputs)
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    expected = reference_op(*ref_inputs, **args)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, dy)
    ref_grads = torch.autograd.grad(expected, ref_inputs, dy.double())
    torch.testing.assert_close(y.double(), expected, rtol=2e-3, atol=2e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=5e-3, atol=5e-3)


@pytest.mark.gpu
def test_quick_gpu_run(tmp_path):
    out = tmp_path / "bench"
    argv = ["--quick", "--out", str(out), "--stages", "3", "--kernel-sizes", "7", "--no-models",
            "--providers", "sasa", "sasa_layer", "conv3x3", "flex"]
    assert bench.main(argv) == 0
    rows = load_csv(out / "results.csv")
    layer = [r for r in rows if r["section"] == "layer"]
    for r in layer:
        if r["provider"] in ("sasa", "sasa_layer", "conv3x3"):
            assert r["ms_median"] is not None, f"{r['provider']} {r['pass']}: {r['note']}"
            assert r["peak_mem_mb"] > 0
