"""The benchmark harness (`python -m sasa_triton.bench`) and its FlexAttention baseline."""
import contextlib
import csv
import os
import subprocess
import sys
import warnings

import pytest
import torch

from sasa_triton import bench
from sasa_triton._bench_flex import flex_available, flex_local_attention2d
from sasa_triton._bench_plot import find_results, load_csv, plot_models, plot_roofline, roofs
from sasa_triton.reference import local_attention2d as reference_op

from helpers import load_bench_script

HAS_CUDA = torch.cuda.is_available()


def _resolved(argv, device):
    args = bench.parse_args(argv)
    bench._resolve_defaults(args, torch.device(device))
    return args


def test_quick_cpu_run_writes_csv_table_and_plots(tmp_path, monkeypatch, capsys):
    # No --out: a --quick run goes to its own folder, never over a full run's bench_out/.
    monkeypatch.chdir(tmp_path)
    def tuning_environment():
        return {k: v for k, v in os.environ.items() if k.startswith(("SASA_", "TRITON_"))}
    environ = tuning_environment()
    argv = ["--quick", "--device", "cpu", "--stages", "4", "--image-size", "32", "--batch", "2"]
    assert bench.main(argv) == 0
    assert tuning_environment() == environ, "the benchmark must not set anything (e.g. enable tuning)"
    out = tmp_path / "bench_out_quick"
    assert not (tmp_path / "bench_out").exists()
    captured = capsys.readouterr()
    printed = captured.out
    assert bench.CPU_LABEL in printed, "a CPU run must say it is not the GPU numbers"
    assert "kernel configs: none" in printed and "Issue-12 targets" in printed
    assert "[1/" in captured.err and "eta" in captured.err, "no progress lines on stderr"

    with open(out / "results.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == bench.FIELDS
        raw = list(reader)
    rows = load_csv(out / "results.csv")
    assert len(rows) == len(raw) > 0
    timed = {(r["section"], r["provider"], r["pass"]) for r in rows if r["ms_median"] is not None}
    # The default plan at k = 7 (on a CPU the op's rows run its reference path, labelled so).
    expected = {("layer", "sasa", "fwd"), ("layer", "sasa", "fwd+bwd"), ("layer", "sasa_layer", "fwd+bwd"),
                ("layer", "conv3x3", "fwd+bwd")}
    expected |= {("model", m, p) for m in ("resnet26", "sasa_resnet26(conv stem)") for p in ("inference", "training")}
    expected |= {("roofline", "copy", "-"), ("roofline", "matmul", "-")}
    assert timed == expected
    sasa = [r for r in rows if r["provider"] == "sasa"]
    assert all(r["backend"] == "reference" and "reference path" in r["note"] and r["k"] == 7 for r in sasa)
    # Providers that do not run on a CPU are kept as one row with the reason.
    skipped = {r["provider"]: r["note"] for r in rows if r["section"] == "layer" and r["ms_median"] is None}
    assert set(skipped) == {"reference", "flex", "layers"} and all(skipped.values())
    assert skipped["layers"] == "CUDA graphs: CUDA only"
    for r in rows:
        if r["section"] == "layer" and r["ms_median"] is not None:
            assert r["ms_p20"] <= r["ms_median"] <= r["ms_p80"]
            assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["gbps"] > 0 and r["roofline_frac"] > 0
            assert r["device"] == "cpu" and r["peak_mem_mb"] is None  # no peak memory on a CPU
    bandwidth, matmul = roofs(rows)
    assert bandwidth > 0 and matmul > 0

    table = (out / "table.txt").read_text()
    assert bench.CPU_LABEL in table and "conv3x3" in table and "sasa_layer" in table and "Issue-12" in table
    for png in ("layer_throughput.png", "speedup_vs_conv.png", "roofline.png", "models.png"):
        assert (out / png).stat().st_size > 1000, png


def test_readme_example_times_sasa_on_cpu_and_plots_without_warnings(tmp_path):
    # The README's `--providers sasa conv3x3 --kernel-sizes 7 --no-models`, on one small stage.
    argv = ["--providers", "sasa", "conv3x3", "--kernel-sizes", "7", "--no-models", "--device", "cpu",
            "--quick", "--stages", "4", "--batch", "1", "--out", str(tmp_path)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bench.main(argv) == 0
    assert not [w for w in caught if "artists" in str(w.message)], [str(w.message) for w in caught]
    rows = load_csv(tmp_path / "results.csv")
    timed = {(r["provider"], r["pass"]) for r in rows if r["section"] == "layer" and r["ms_median"] is not None}
    assert timed == {("sasa", "fwd"), ("sasa", "fwd+bwd"), ("conv3x3", "fwd+bwd")}


def test_defaults_per_plan_and_device():
    args = _resolved(["--quick"], "cpu")
    assert (args.batch, args.stages, args.kernel_sizes, args.dtype, args.model_depths, args.out) == \
           (1, [3, 4], [7], "fp32", [26], "bench_out_quick")
    args = _resolved([], "cuda")
    assert (args.batch, args.stages, args.kernel_sizes, args.dtype, args.model_depths, args.out) == \
           (32, [1, 2, 3, 4], [7], "bf16", [50], "bench_out")
    assert args.providers == ["sasa", "sasa_layer", "conv3x3", "flex", "reference"]
    args = _resolved(["--full"], "cuda")
    assert (args.kernel_sizes, args.providers, args.model_depths, args.out) == \
           ([3, 5, 7, 9, 11], list(bench.PROVIDERS), [26, 50], "bench_out_full")
    assert _resolved(["--full", "--quick", "--out", "x"], "cuda").out == "x"
    with pytest.raises(SystemExit):
        bench.parse_args(["--kernel-sizes", "4"])


def test_help_uses_the_callers_command_name(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"], prog="sasa-triton bench")
    assert capsys.readouterr().out.startswith("usage: sasa-triton bench")


def test_default_plan_rows(monkeypatch):
    # The plan itself needs no GPU: what a CUDA run would time, at the H100's copy bandwidth.
    monkeypatch.setattr(bench, "provider_skip_reason", lambda provider, device: None)
    args = _resolved([], "cuda")
    cases, left_out = bench.make_plan(args, torch.device("cuda"), "gpu", bandwidth_gbps=3000.0)
    assert left_out == []
    layer = {(c.provider, c.shape, c.k, c.pass_) for c in cases if c.section == "layer"}
    graphed = {("sasa", "fwd"), ("sasa", "fwd+bwd"), ("sasa_layer", "fwd+bwd"), ("conv3x3", "fwd+bwd")}
    for name, _, _ in bench.STAGES:
        assert {(p, s) for p, s_, k, s in layer if s_ == name} == graphed | {
            ("flex", "fwd"), ("reference", "fwd"), ("reference", "fwd+bwd")} | {
            (p, s + bench.GRAPH_SUFFIX) for p, s in graphed}
    # The graph replays after every eager layer row (a failed capture spoils no eager row), before the models.
    layer_passes = [c.pass_ for c in cases if c.section == "layer"]
    first_graphed = next(i for i, s in enumerate(layer_passes) if s.endswith(bench.GRAPH_SUFFIX))
    assert all(s.endswith(bench.GRAPH_SUFFIX) for s in layer_passes[first_graphed:])
    assert {k for p, _, k, _ in layer} == {3, 7} and {k for p, _, k, _ in layer if p == "conv3x3"} == {3}
    models = [(c.name, c.pass_) for c in cases if c.section == "model"]
    eager = [("resnet50", "inference"), ("resnet50", "training"),
             ("sasa_resnet50(conv stem)", "inference"), ("sasa_resnet50(conv stem)", "training")]
    # then training with the backward on the calling thread, then the steps captured in CUDA graphs, last
    caller = [(name, pass_ + bench.CALLER_SUFFIX) for name, pass_ in eager if pass_ == "training"]
    assert models == eager + caller + [(name, pass_ + bench.GRAPH_SUFFIX) for name, pass_ in eager]
    assert [c.section for c in cases[-4:]] == ["model"] * 4 and cases[-1].pass_.endswith(bench.GRAPH_SUFFIX)
    assert len(cases) == 54
    # The full plan: conv_kxk at k = 3 would be conv3x3 again, so it is left out.
    cases, _ = bench.make_plan(_resolved(["--full"], "cuda"), torch.device("cuda"), "gpu", 3000.0)
    assert not [c for c in cases if c.provider == "conv_kxk" and c.k == 3]
    assert {c.name for c in cases if c.section == "model"} == {bench._model_label(n, s) for n, s in bench.MODELS}


def test_slow_reference_rows_are_left_out_with_a_note(monkeypatch):
    monkeypatch.setattr(bench, "provider_skip_reason", lambda provider, device: None)
    args = _resolved(["--providers", "reference", "--no-models"], "cuda")
    # At 20 GB/s the 56x56x64 stage (batch 32) would take over half a second per call; 7x7x512 stays.
    cases, left_out = bench.make_plan(args, torch.device("cuda"), "gpu", bandwidth_gbps=20.0)
    assert {r.shape for r in left_out} >= {"56x56x64"} and all("skipped" in r.note for r in left_out)
    assert all(r.ms_median is None for r in left_out)
    timed = {(c.shape, c.pass_) for c in cases}
    assert {("7x7x512", "fwd"), ("7x7x512", "fwd+bwd")} <= timed and not {s for s, _ in timed} & {"56x56x64"}
    seconds = bench.reference_seconds(32, 56, 56, 64, 7, False, 20.0)
    assert seconds > bench.REFERENCE_MAX_SECONDS


def test_progress_lines(capsys):
    progress = bench.Progress(3)
    progress.begin("56x56x64 k=7 sasa fwd")
    progress.end(bench.Row("layer", "cpu", "fp32", "sasa", "", "56x56x64", 1, 56, 56, 64, 8, 8, 7, "fwd",
                           note="failed: X"))
    progress.begin("56x56x64 k=7 sasa fwd+bwd")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("[1/3] 56x56x64 k=7 sasa fwd") and lines[0].endswith("eta ?")
    assert lines[1].strip() == "failed: X"
    assert lines[2].startswith("[2/3] 56x56x64 k=7 sasa fwd+bwd") and "eta ?" not in lines[2]
    assert [bench._duration(s) for s in (5, 80, 3700)] == ["5s", "1m20s", "1h01m"]


def _layer_row(provider, shape, k, pass_, ms, roofline_frac=None):
    return bench.Row("layer", "gpu", "bf16", provider, "", shape, 32, 0, 0, 64, 8, 8, k, pass_, ms_median=ms,
                     gbps=1.0 if roofline_frac else None, roofline_frac=roofline_frac)


def _model_row(provider, pass_, images_per_s):
    return bench.Row("model", "gpu", "bf16", provider, "", "224x224", 32, 224, 224, 3, "", "", "", pass_,
                     ms_median=1.0, images_per_s=images_per_s)


def test_target_summary_reads_the_issue_12_ratios():
    rows = [_layer_row("sasa", "56x56x64", 7, "fwd", 0.1, roofline_frac=0.4),
            _layer_row("sasa", "56x56x64", 7, "fwd+bwd", 0.4),
            _layer_row("sasa_layer", "56x56x64", 7, "fwd+bwd", 0.6),
            _layer_row("conv3x3", "56x56x64", 3, "fwd+bwd", 0.4),
            _layer_row("sasa", "7x7x512", 7, "fwd", 0.1, roofline_frac=0.05),
            _model_row("resnet50", "training", 1000.0), _model_row("sasa_resnet50(conv stem)", "training", 800.0),
            _model_row("resnet50", "inference", 1000.0), _model_row("sasa_resnet50(conv stem)", "inference", 500.0)]
    text = bench.target_summary(rows, cpu=False)
    line = line_eager = next(s for s in text.splitlines() if s.startswith("56x56x64"))
    assert "40.0 % ok" in line and "4.00x miss" in line and "1.50x ok" in line
    line = next(s for s in text.splitlines() if s.startswith("7x7x512"))
    assert "5.0 % miss" in line and line.count(" - ") + line.endswith(" -") >= 1
    assert "training 0.80x (>= 0.75x: ok)" in text and "inference 0.50x (>= 0.6x: miss)" in text
    assert "CPU run" in bench.target_summary(rows, cpu=True)
    assert "CUDA graph" not in text  # no graph rows, no second table
    # The same ratios of the graph replays, in a second table under its own line.
    graph = bench.GRAPH_SUFFIX
    rows += [_layer_row("sasa", "56x56x64", 7, "fwd" + graph, 0.05, roofline_frac=0.8),
             _layer_row("sasa", "56x56x64", 7, "fwd+bwd" + graph, 0.125),
             _layer_row("sasa_layer", "56x56x64", 7, "fwd+bwd" + graph, 0.5),
             _layer_row("conv3x3", "56x56x64", 3, "fwd+bwd" + graph, 0.2)]
    lines = bench.target_summary(rows, cpu=False).splitlines()
    eager, replayed = [i for i, s in enumerate(lines) if s.startswith("56x56x64")]
    assert lines[eager] == line_eager
    assert any("CUDA graph" in s for s in lines[eager:replayed])
    assert "80.0 % ok" in lines[replayed] and "2.50x ok" in lines[replayed] and "2.50x miss" in lines[replayed]


def test_config_source_names_the_configs_and_sets_nothing(monkeypatch):
    assert bench.config_source(torch.device("cpu")).startswith("kernel configs: none")
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "0")
    text = bench.config_source(torch.device("cuda"))  # only reads files and the environment
    assert text.startswith("kernel configs: default configs") and text.endswith("nothing is tuned in this process")
    monkeypatch.delenv("SASA_TRITON_AUTOTUNE")
    assert bench.config_source(torch.device("cuda")).startswith("kernel configs:")
    assert "SASA_TRITON_AUTOTUNE" not in os.environ


def test_config_source_counts_the_tuned_keys(tmp_path, monkeypatch):
    from sasa_triton import tuning

    # A tuned file for this "GPU" (the interpreter here) holding one key of the default plan.
    key = tuning.config_key("local_fwd", 7, 1, 64, torch.bfloat16, 7, 7)
    path = str(tmp_path / "tuned.json")
    tuning.save_tuned(path, {key: tuning.default_config("local_fwd", 7, 1, 64, torch.bfloat16)})
    monkeypatch.setenv("SASA_TRITON_CONFIG_FILE", path)
    monkeypatch.delenv("SASA_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(bench, "provider_skip_reason", lambda provider, device: None)
    tuning.clear_cache()
    try:
        cases, _ = bench.make_plan(_resolved([], "cuda"), torch.device("cuda"), "gpu", 3000.0)
        text = bench.config_source(torch.device("cuda"), cases, torch.bfloat16)
    finally:
        tuning.clear_cache()
    assert text.startswith(f"kernel configs: tuned file {path}") and "(1 of the 12 local-attention keys" in text


def test_find_results_searches_up_to_the_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("SASA_BENCH_CSV", raising=False)
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    assert find_results(root / "notebooks") is None  # stops at the project root
    for run in ("2026-11-29-H200", "2026-11-30-H200", "2026-12-01-empty"):  # recorded GPU runs
        (root / "bench" / "results" / run).mkdir(parents=True)
    for run in ("2026-11-29-H200", "2026-11-30-H200"):
        (root / "bench" / "results" / run / "results.csv").write_text("section\n")
    recorded = root / "bench" / "results" / "2026-11-30-H200" / "results.csv"
    assert find_results(root / "notebooks") == str(recorded)  # the newest with a results.csv
    for name, age in (("bench_out", 100), ("bench_out_quick", 0)):
        (root / name).mkdir()
        (root / name / "results.csv").write_text("section\n")
        os.utime(root / name / "results.csv", (1e9 - age, 1e9 - age))
    assert find_results(root / "notebooks") == str(root / "bench_out_quick" / "results.csv")  # the newest
    monkeypatch.setenv("SASA_BENCH_CSV", "elsewhere.csv")
    assert find_results(root / "notebooks") == "elsewhere.csv"


def test_roofline_marks_duplicates_and_points_above_the_roof():
    def row(provider, k, tflops, gbps, pass_="fwd"):
        return {**bench.Row("layer", "cpu", "fp32", provider, "", "7x7x512", 1, 7, 7, 512, 8, 64, k, pass_,
                            ms_median=1.0, tflops=tflops, gbps=gbps).as_dict()}
    roof = [{**bench.Row("roofline", "cpu", "fp32", "copy", "", "", 1, 0, 0, 0, "", "", "", "-", ms_median=1.0,
                         gbps=10.0).as_dict()},
            {**bench.Row("roofline", "cpu", "fp32", "matmul", "", "", 1, 0, 0, 0, "", "", "", "-", ms_median=1.0,
                         tflops=1.0).as_dict()}]
    below = [row("conv3x3", 3, 0.05, 1.0), row("conv_kxk", 3, 0.05, 1.0), row("sasa", 7, 0.001, 1.0)]
    fig = plot_roofline(roof + below)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "conv3x3" in labels and "conv_kxk" not in labels  # the k = 3 duplicate of conv3x3 is dropped
    assert not fig.texts
    fig = plot_roofline(roof + below + [row("sasa", 7, 0.1, 20.0)])  # 20 GB/s against a 10 GB/s roof
    assert len(fig.texts) == 1 and "1 point above the roof" in fig.texts[0].get_text()


def test_model_plot_leaves_room_for_value_labels():
    rows = [_model_row("resnet50", "training", 1000.0).as_dict(), _model_row("resnet50", "inference", 3000.0).as_dict()]
    ax = plot_models(rows).axes[0]
    assert ax.get_xlim()[1] >= 1.15 * 3000.0


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
def test_default_plan_cli_on_gpu(tmp_path):
    # The README's command as a user runs it (a child process), the default plan at a small batch
    # and short timing: every row of the plan is timed on the GPU, nothing fails.
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "sasa_triton.bench", "--quick", "--batch", "2", "--image-size", "64",
               "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "kernel configs:" in result.stdout and "Issue-12 targets" in result.stdout
    rows = load_csv(out / "results.csv")
    layer = {(r["provider"], r["shape"], r["pass"]): r for r in rows if r["section"] == "layer"}
    for name, _, _ in bench.STAGES:
        graphed = [("sasa", "fwd"), ("sasa", "fwd+bwd"), ("sasa_layer", "fwd+bwd"), ("conv3x3", "fwd+bwd")]
        for provider, pass_ in graphed + [(p, s + bench.GRAPH_SUFFIX) for p, s in graphed] + [
                ("reference", "fwd"), ("reference", "fwd+bwd")]:
            r = layer[(provider, name, pass_)]
            assert r["ms_median"] is not None and r["peak_mem_mb"] > 0, f"{provider} {name} {pass_}: {r['note']}"
        if flex_available():
            r = layer[("flex", name, "fwd")]
            assert r["ms_median"] is not None, f"flex {name}: {r['note']}"
    models = {(r["provider"], r["pass"]): r for r in rows if r["section"] == "model"}
    assert all(models[(m, p)]["ms_median"] is not None for m in ("resnet50", "sasa_resnet50(conv stem)")
               for p in ("inference", "training")), models


class OneCallTimer:
    """bench.Timer's interface for the CPU tests: calls fn once, returns fixed quantiles."""
    mode = "quick"

    def __call__(self, fn, **kwargs):
        fn()
        return 1.0, 0.9, 1.1

    def peak_memory_mb(self, fn):
        return None


def test_cuda_graph_training_step_follows_the_capture_recipe(monkeypatch):
    """The graphed model rows (CUDA only) as PyTorch's whole-network capture recipe has them:
    warm-up steps on a side stream with the gradients set to None before each, None again before
    the capture, one step captured, and the timer given the graph's replay. Checked on the CPU
    with torch.cuda's stream and graph calls recorded instead of run."""
    events = []

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def recorded(begin, end, _arg):
        events.append(begin)
        yield
        events.append(end)

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: recorded("side stream", "main stream", s))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda g: recorded("capture begins", "capture ends", g))
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(10))
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    model(x)
    original_step = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        events.append("step" if all(p.grad is not None for p in self.param_groups[0]["params"]) else "step without grads")
        return original_step(self, *args, **kwargs)

    def zero_grad(self, set_to_none=True):
        assert set_to_none
        for p in self.param_groups[0]["params"]:
            p.grad = None
        events.append("grads None")

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    monkeypatch.setattr(torch.optim.SGD, "zero_grad", zero_grad)
    timer = OneCallTimer()
    case = bench.Case("model", "resnet26", "8x8", 8, 3, "", "training" + bench.GRAPH_SUFFIX)
    row = bench.Row("model", "cpu", "fp32", "resnet26", "-", "8x8", 2, 8, 8, 3, "", "", "", case.pass_)
    args = type("Args", (), {"batch": 2})()
    bench._time_model(row, case, (model, x, target, contextlib.nullcontext(), 1e6), args, timer)
    warm = ["grads None", "step"] * 3
    assert events == ["side stream", *warm, "main stream", "grads None", "capture begins", "step", "capture ends",
                      "replay"]
    assert row.ms_median == 1.0 and row.images_per_s == 2 / 1e-3


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_graphed_layer_rows_time_the_replay_of_one_captured_call(monkeypatch, pass_):
    """A layer row "(CUDA graph)" captures the eager row's call once (the capture recipe of the
    model rows, bench._captured) and times the graph's replays, counting the same work. Checked on
    the CPU with the capture replaced by a recorder."""
    steps, events = [], []

    def captured(step, prepare=lambda: None, warmup=3):
        steps.append(step)
        return lambda: events.append("replay")

    monkeypatch.setattr(bench, "_captured", captured)
    args = type("Args", (), {"batch": 2})()
    results = {}
    for suffix in ("", bench.GRAPH_SUFFIX):
        case = bench.Case("layer", "sasa", "6x6x16", 6, 16, 3, pass_ + suffix)
        row = bench.Row("layer", "cpu", "fp32", "sasa", "", case.shape, 2, 6, 6, 16, 8, 2, 3, case.pass_)
        setup = bench._make_layer_case(case, args, torch.device("cpu"), torch.float32)
        bench._time_layer(row, case, setup, args, OneCallTimer(), torch.float32, 100.0)
        results[suffix] = row
    assert len(steps) == 1 and events == ["replay"]  # the eager row captured nothing
    out = steps[0]()  # what was captured: the eager row's call
    assert (out is None) == (pass_ == "fwd+bwd") and (out is None or not out.requires_grad)
    eager, graphed = results[""], results[bench.GRAPH_SUFFIX]
    assert graphed.gflop == eager.gflop and graphed.mbytes == eager.mbytes and graphed.ms_median == 1.0


def test_caller_thread_training_rows_time_with_autograd_multithreading_off():
    """The "(backward on the calling thread)" training rows time every step with the autograd
    engine's device threads off, and leave the flag as it was; the other rows leave it alone."""
    seen = []

    class Timer(OneCallTimer):
        def __call__(self, fn, **kwargs):
            quantiles = super().__call__(fn)
            seen.append(torch._C._is_multithreading_enabled())
            return quantiles

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 10))
    x, target = torch.randn(2, 3, 8, 8), torch.tensor([1, 2])
    args = type("Args", (), {"batch": 2})()
    before = torch._C._is_multithreading_enabled()
    for pass_ in ("training" + bench.CALLER_SUFFIX, "training"):
        case = bench.Case("model", "resnet26", "8x8", 8, 3, "", pass_)
        row = bench.Row("model", "cpu", "fp32", "resnet26", "-", "8x8", 2, 8, 8, 3, "", "", "", case.pass_)
        bench._time_model(row, case, (model, x, target, contextlib.nullcontext(), 1e6), args, Timer())
        assert row.ms_median == 1.0
    assert seen == [False, before] and torch._C._is_multithreading_enabled() == before


def test_host_path_benchmark_reaches_the_launch_stub(device):
    """python -m sasa_triton.bench_host's measurement: the op and PyTorch's floor, timed through
    the stubbed launch (measure asserts that a launch reached the stub), leaving the thread
    count as it was."""
    if device.type != "cpu":
        pytest.skip("the launch-stubbed benchmark runs the interpreter's CPU path")
    from sasa_triton import bench_host

    threads = torch.get_num_threads()
    result = bench_host.measure(calls=40)
    assert torch.get_num_threads() == threads
    for name in ("fwd_us", "fwd_bwd_us", "floor_fwd_us", "floor_fwd_bwd_us", "native_fwd_bwd_us", "fwd_bwd_chain_us",
                 "floor_fwd_bwd_chain_us", "layer_fwd_us", "layer_fwd_bwd_us", "proj_fwd_us", "proj_fwd_bwd_us"):
        assert 0 < result[name] < 1e6, (name, result)
    assert result["stubbed"] and result["shape"] == [1, 7, 7, 8, 64]


@pytest.mark.gpu
def test_gpu_host_path_benchmark_launches_the_kernels():
    """bench_host --gpu: CUDA tensors, the kernels really launched, wall time per call."""
    from sasa_triton import bench_host

    result = bench_host.measure(calls=40, device="cuda", stub=False, dtype_name="bfloat16")
    for name in ("fwd_us", "fwd_bwd_us", "floor_fwd_us", "floor_fwd_bwd_us", "native_fwd_bwd_us", "fwd_bwd_chain_us",
                 "floor_fwd_bwd_chain_us", "layer_fwd_us", "layer_fwd_bwd_us", "proj_fwd_us", "proj_fwd_bwd_us"):
        assert 0 < result[name] < 1e6, (name, result)


def test_fuzz_script_runs_its_cases():
    """bench/fuzz_ops.py (random shapes and options of the local and stem ops against float64,
    under the interpreter) prints a line per case and exits 0 when every case is within bounds."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "bench", "fuzz_ops.py"), "--seed", "7", "--cases", "6"],
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("\nok   ") + proc.stdout.startswith("ok   ") == 6
    assert "6 of 6 cases within bounds, 0 failed" in proc.stdout
    assert "local " in proc.stdout and "spatial " in proc.stdout


@pytest.mark.parametrize("path", ["sasa_triton/ops/local_attention.py", "sasa_triton/ops/spatial_attention.py",
                                  "sasa_triton/ops/attention_stem.py"])
def test_mutation_script_writes_each_mutant_as_one_change(path):
    """bench/mutants.py: a mutant of a kernel file (40 drawn of each file's hundreds) is Python
    with another syntax tree than the file's, and every line outside the expression it names is
    the file's."""
    import ast
    import random
    mutants = load_bench_script("mutants")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, path)) as f:
        source = f.read()
    tree, lines = ast.dump(ast.parse(source)), source.splitlines(keepends=True)
    found = mutants.sites(source)
    assert len(found) > 100
    for site in random.Random(0).sample(found, 40):
        mutated = mutants.apply(source, site)
        assert ast.dump(ast.parse(mutated)) != tree, site
        before, after = "".join(lines[:site["line"] - 1]), "".join(lines[site["end_line"]:])
        assert mutated.startswith(before) and mutated.endswith(after), site


def test_mutation_script_kills_a_wrong_kernel(tmp_path):
    """One mutant of the forward kernel's addressing, run through bench/mutants.py against one
    test, is killed, and the private copy gets the kernel file back unchanged."""
    mutants = load_bench_script("mutants")
    path = "sasa_triton/ops/local_attention.py"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, path)) as f:
        source = f.read()
    site = next(s for s in mutants.sites(source) if s["function"] == "_pixel_ptrs" and s["what"] == "Mult -> Div")
    repo = mutants._copy_repo(str(tmp_path))
    test = "tests/test_local_attention.py::test_public_op_matches_reference"
    result = mutants.run_one(repo, path, source, site, [test, "-k", "fp32"], timeout=300)
    assert result["outcome"] == "killed", result
    with open(os.path.join(repo, path)) as f:
        assert f.read() == source
