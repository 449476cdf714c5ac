"""Autotuning: the config space per window size, the resource pruning (checked against sm_90
compilation), the lookup order and the tuned-file cache, and the `python -m sasa_triton.autotune`
command under the interpreter.

SASA_TRITON_EXTENDED_TESTS=1 compiles every pruned candidate of the sample instead of the
riskiest ones (minutes).
"""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from sasa_triton import tuning

KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
EXTENDED = os.environ.get("SASA_TRITON_EXTENDED_TESTS", "0") not in ("", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test starts with an empty process cache and a private cache directory."""
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SASA_TRITON_CONFIG_FILE", raising=False)
    monkeypatch.delenv("SASA_TRITON_AUTOTUNE", raising=False)
    monkeypatch.delenv("SASA_TRITON_AUTOTUNE_SAVE", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


# ----------------------------------------------------------------------------------------------
# (a) The config space
# ----------------------------------------------------------------------------------------------

def check_launch_constraints(config, kernel_size, dilation, where):
    """What the local-attention launchers require of a config."""
    assert set(config) == {"BLOCK_H", "BLOCK_W", "num_warps", "num_stages"}, where
    bh, bw = config["BLOCK_H"], config["BLOCK_W"]
    assert is_pow2(bh) and is_pow2(bw), where
    assert bh * bw >= 16, f"query tile {bh}x{bw} < 16 (tl.dot): {where}"
    halo = tuning.halo_width(bw, kernel_size, dilation)
    assert is_pow2(halo) and halo >= max(16, bw + 2 * dilation * (kernel_size // 2)), where
    assert config["num_warps"] in (1, 2, 4, 8, 16), where
    assert 1 <= config["num_stages"] <= 4, where


@pytest.mark.parametrize("kernel_size", range(3, 16, 2), ids=lambda k: f"k{k}")
def test_config_space_valid_for_every_window(kernel_size):
    limits = {"max_shared_mem": tuning.SM90_SHARED_MEM, "max_registers": tuning.REGISTER_BUDGET}
    for head_dim in (8, 16, 24, 32, 48, 64, 96, 128):
        for dtype in DTYPES:
            for kernel in KERNELS:
                for dilation, (H, W) in ((1, (56, 56)), (1, (7, 7)), (2, (28, 28)), (1, (2, 3))):
                    where = f"{kernel} k={kernel_size} d={dilation} D={head_dim} {dtype} {H}x{W}"
                    space = tuning.candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, H, W,
                                                     prune=False, limits=limits)
                    kept = tuning.candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, H, W,
                                                    limits=limits)
                    default = tuning.default_config(kernel, kernel_size, dilation, head_dim, dtype)
                    assert kept[0] == default, where
                    # The paper's range leaves something to tune (fp32 and D > 64 may leave only
                    # the default: the estimate is conservative where ptxas spills erratically).
                    if dtype != torch.float32 and head_dim <= 64 and min(H, W) >= 7:
                        assert len(kept) > 1, f"nothing to tune beyond the default: {where}"
                    for config in space:
                        check_launch_constraints(config, kernel_size, dilation, where)
                    for config in kept[1:]:
                        assert tuning.fits(kernel, config, kernel_size, dilation, head_dim, dtype, limits), where
                        assert config["BLOCK_W"] <= max(4, tuning.bucket(W)), where


def test_config_space_depends_on_window_size():
    """A 3x3 and a 15x15 window get different tiles: the 15x15 window's halo makes narrow tiles
    useless (the widest tile per padded halo width is kept)."""
    def tiles(k):
        configs = tuning.candidate_configs("local_fwd", k, 1, 64, torch.bfloat16, 56, 56)[1:]
        return {(c["BLOCK_H"], c["BLOCK_W"]) for c in configs}
    assert tiles(3) != tiles(15)
    assert {w for _, w in tiles(3)} == {8, 16, 32}      # halos 16, 32, 64
    assert {w for _, w in tiles(15)} == {16, 32}        # 8 + 14 pads to 32 as 16 + 14 does
    # Small images: no tile wider or (beyond the minimum) taller than the image's bucket.
    small = tuning.candidate_configs("local_fwd", 7, 1, 64, torch.bfloat16, 7, 7)[1:]
    assert all(c["BLOCK_W"] <= 8 and (c["BLOCK_H"] <= 8 or c["BLOCK_H"] * c["BLOCK_W"] == 16) for c in small)


def test_pruning_uses_the_estimate():
    big = {"BLOCK_H": 16, "BLOCK_W": 16, "num_warps": 2, "num_stages": 3}
    small = {"BLOCK_H": 2, "BLOCK_W": 8, "num_warps": 4, "num_stages": 1}
    for kernel in KERNELS:
        assert not tuning.fits(kernel, big, 7, 1, 128, torch.float32)
        assert tuning.fits(kernel, small, 7, 1, 64, torch.bfloat16)
    est = tuning.estimate_resources("local_fwd", small, 7, 1, 64, torch.bfloat16)
    assert est["registers"] > 0 and est["shared_mem"] > 0
    # A tiny shared-memory limit prunes everything but the default.
    tiny = {"max_shared_mem": 1024, "max_registers": 255}
    assert tuning.candidate_configs("local_fwd", 7, 1, 64, torch.bfloat16, 56, 56, limits=tiny) == [
        tuning.default_config("local_fwd", 7, 1, 64, torch.bfloat16)]


# The sample compiled for sm_90: per (k, D, dtype) and kernel, the pruned candidates the estimate
# puts closest to the register budget (the first to spill if the estimate were too generous).
SAMPLE = [(3, 64, "bfloat16"), (15, 32, "float16"), (7, 16, "float32")]
COMPILE_SCRIPT = r"""
import json, sys, torch
from sasa_triton import tuning
from sasa_triton.ops.local_attention import static_specs
from sasa_triton._compile import static_report
jobs = json.loads(sys.argv[1])
for kernel, k, D, dtype_name, config in jobs:
    dtype = getattr(torch, dtype_name)
    specs = static_specs(shape=(2, 56, 56, 2, D), dtype=dtype, kernel_size=k, configs={kernel: config})
    spec = next(s for s in specs if s.name == kernel)
    report = static_report(spec)
    report.update(head_dim=D, kernel_size=k, dtype=dtype_name, config=config,
                  estimate=tuning.estimate_resources(kernel, config, k, 1, D, dtype))
    print(json.dumps(report), flush=True)
"""


def riskiest(kernel, k, D, dtype, count):
    kept = tuning.candidate_configs(kernel, k, 1, D, dtype, 56, 56)[1:]
    if EXTENDED:
        return kept
    kept.sort(key=lambda c: -tuning.estimate_resources(kernel, c, k, 1, D, dtype)["registers"])
    return kept[:count]


def test_pruned_candidates_compile_for_sm90_without_spills():
    jobs = []
    for i, (k, D, dtype_name) in enumerate(SAMPLE):
        dtype = getattr(torch, dtype_name)
        for kernel in KERNELS if EXTENDED else [KERNELS[i % len(KERNELS)]]:
            for config in riskiest(kernel, k, D, dtype, count=1):
                jobs.append((kernel, k, D, dtype_name, config))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", COMPILE_SCRIPT, json.dumps(jobs)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=3600 if EXTENDED else 300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(reports) == len(jobs)
    failures = []
    for r in reports:
        where = (f"{r['kernel']} k={r['kernel_size']} D={r['head_dim']} {r['dtype']} {r['config']}: "
                 f"{r['registers']} registers (estimated {r['estimate']['registers']}), "
                 f"{r['shared_mem']} B shared (estimated {r['estimate']['shared_mem']})")
        if r["spill_stores"] or r["spill_loads"]:
            failures.append(f"spills: {where}")
        if r["shared_mem"] > min(tuning.SM90_SHARED_MEM, r["estimate"]["shared_mem"]):
            failures.append(f"shared memory over the estimate: {where}")
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# (b) Keys, lookup order, tuned files
# ----------------------------------------------------------------------------------------------

def test_key_buckets_image_size_and_ignores_batch():
    key = tuning.config_key("local_fwd", 7, 1, 64, torch.bfloat16, 56, 56)
    assert key == tuning.config_key("local_fwd", 7, 1, 64, torch.bfloat16, 60, 64)
    assert key != tuning.config_key("local_fwd", 7, 1, 64, torch.bfloat16, 28, 56)
    assert key != tuning.config_key("local_fwd", 7, 1, 64, torch.float16, 56, 56)
    assert key != tuning.config_key("local_fwd", 5, 1, 64, torch.bfloat16, 56, 56)
    assert key != tuning.config_key("local_fwd", 7, 2, 64, torch.bfloat16, 56, 56)
    assert key != tuning.config_key("local_fwd", 7, 1, 32, torch.bfloat16, 56, 56)
    assert key != tuning.config_key("local_bwd_dq", 7, 1, 64, torch.bfloat16, 56, 56)
    assert key == "local_fwd/k7/d1/D64/bf16/H64/W64"
    assert tuning.bucket(56) == tuning.bucket(60) == 64 and tuning.bucket(7) == 8


def never_run(config):
    raise AssertionError("run() must not be called: the config comes from a cache")


TUNED = {"BLOCK_H": 2, "BLOCK_W": 16, "num_warps": 2, "num_stages": 3}


def write_file(path, configs, gpu=None, triton=None, hashes=None):
    data = {
        "format": tuning.FILE_FORMAT,
        "gpu": gpu or tuning.device_name(),
        "triton": triton or tuning.triton_version(),
        "kernel_hashes": hashes or {"local": tuning.kernel_source_hash("local")},
        "configs": configs,
    }
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def key56(kernel="local_fwd", dtype=torch.float32):
    return tuning.config_key(kernel, 7, 1, 32, dtype, 56, 56)


def test_tuned_file_round_trip(monkeypatch):
    path = tuning.save_tuned(entries={key56(): {**TUNED, "ms": 0.5, "default_ms": 0.7, "timed": 9}})
    assert path == tuning.tuned_file() and path.startswith(os.environ["SASA_TRITON_CACHE_DIR"])
    data = json.load(open(path))
    assert data["gpu"] == tuning.device_name() and data["triton"] == tuning.triton_version()
    assert data["kernel_hashes"] == {"local": tuning.kernel_source_hash("local")}
    tuning.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Another image size in the same bucket, any batch: the stored config, run() never called.
        assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 60, 49, run=never_run) == TUNED
    # Other keys are not in the file: the default (autotuning off, so nothing is timed).
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "0")
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 28, 28, run=never_run) == \
        tuning.default_config("local_fwd", 7, 1, 32, torch.float32)
    # save_tuned merges with the file already there.
    tuning.save_tuned(entries={key56("local_bwd_dq"): {**TUNED, "num_warps": 4}})
    assert set(json.load(open(path))["configs"]) == {key56(), key56("local_bwd_dq")}


def test_explicit_file_has_priority_over_the_cache_directory(tmp_path, monkeypatch):
    write_file(tuning.tuned_file(), {key56(): {**TUNED, "num_warps": 8}})
    explicit = str(tmp_path / "mine.json")
    write_file(explicit, {key56(): TUNED})
    monkeypatch.setenv("SASA_TRITON_CONFIG_FILE", explicit)
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56, run=never_run) == TUNED


# (ids avoid the word "gpu": conftest skips tests with that keyword when there is no GPU)
@pytest.mark.parametrize("stale", ["other-device", "other-triton", "other-kernels"])
def test_stale_file_is_ignored_with_a_warning(stale, monkeypatch):
    kwargs = {"other-device": {"gpu": "NVIDIA A100-SXM4-80GB"}, "other-triton": {"triton": "2.0.0"},
              "other-kernels": {"hashes": {"local": "0123456789abcdef"}}}
    write_file(tuning.tuned_file(), {key56(): TUNED}, **kwargs[stale])
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "0")
    with pytest.warns(UserWarning, match="ignoring") as record:
        config = tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56, run=never_run)
    assert config == tuning.default_config("local_fwd", 7, 1, 32, torch.float32)
    assert len(record) == 1 and "\n" not in str(record[0].message)


def test_memory_cache_then_file_then_tuning(monkeypatch):
    calls = []

    def run(config):
        calls.append(config)

    # Under the interpreter: "tuning" is the default, nothing is run or timed; cached in memory.
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: True)
    config = tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56, run=run)
    assert config == tuning.default_config("local_fwd", 7, 1, 32, torch.float32)
    assert calls == []
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 50, 50, run=never_run) == config


def test_autotune_times_pruned_candidates_and_keeps_the_fastest(monkeypatch):
    """The timing loop itself, with a fake clock: the two-stage search, failures skipped."""
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    kernel, args = "local_bwd_dq", (7, 1, 64, torch.bfloat16, 56, 56)
    candidates = tuning.candidate_configs(kernel, *args)
    fastest = candidates[-1]
    broken = candidates[1]

    def fake_bench(run, config):
        run(config)
        if config == broken:
            raise RuntimeError("out of resources: shared memory")
        if config == fastest:
            return 0.5
        same_tile = (config["BLOCK_H"], config["BLOCK_W"]) == (fastest["BLOCK_H"], fastest["BLOCK_W"])
        return 0.8 if same_tile else 1.0 + config["BLOCK_H"] / 100

    timed = []
    monkeypatch.setattr(tuning, "_bench", fake_bench)
    for mode in ("full", "on"):
        timed.clear()
        best, entry = tuning.autotune(kernel, *args, run=timed.append, mode=mode)
        assert best == fastest and entry["ms"] == 0.5 and entry["timed"] == len(timed)
        assert timed[0] == candidates[0]  # the default first
        assert all(c in candidates for c in timed)
        if mode == "full":
            assert len(timed) == len(candidates)
        else:
            assert len(timed) < len(candidates)


def test_get_config_tunes_on_cuda_only_when_enabled(monkeypatch):
    fake = {"BLOCK_H": 4, "BLOCK_W": 8, "num_warps": 4, "num_stages": 2}
    monkeypatch.setattr(tuning, "_cuda_in_use", lambda: True)
    monkeypatch.setattr(tuning, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(tuning, "autotune", lambda *a, **k: (fake, {**fake, "ms": 1.0}))
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "0")
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float16, 56, 56, run=never_run) != fake
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "1")
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float16, 56, 56) != fake  # no run: default
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float16, 56, 56, run=lambda c: None) == fake
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float16, 64, 64, run=never_run) == fake  # memory


def test_kernel_hash_covers_the_jit_sources():
    h = tuning.kernel_source_hash("local")
    assert h and len(h) == 16 and h == tuning.kernel_source_hash("local")
    assert tuning.kernel_source_hash("nonexistent") is None


# ----------------------------------------------------------------------------------------------
# (c) The command
# ----------------------------------------------------------------------------------------------

def run_cli(args, tmp_path, interpret):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SASA_TRITON_CACHE_DIR=str(tmp_path / "cli-cache"), CUDA_VISIBLE_DEVICES="")
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-m", "sasa_triton", "autotune", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cli_under_interpreter_writes_a_loadable_file(tmp_path, monkeypatch):
    proc = run_cli(["--dtypes", "fp32"], tmp_path, interpret=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = proc.stdout.strip().splitlines()[-1]
    assert path == str(tmp_path / "cli-cache" / "triton-interpreter.json")
    data = json.load(open(path))
    assert data["gpu"] == "triton-interpreter" and data["triton"] == tuning.triton_version()
    local = [key for key in data["configs"] if key.startswith("local_")]
    assert len(local) == 6  # two tiny shapes x three kernels
    assert "[3/3]" in proc.stderr  # and the stem's shape
    assert data["kernel_hashes"]["local"] == tuning.kernel_source_hash("local")
    # This process (the interpreter too) loads it and runs the stored configs without timing.
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "cli-cache"))
    tuning.clear_cache()
    key, entry = next(iter(data["configs"].items()))
    kernel, k, d, D, dtype, H, W = key.split("/")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = tuning.get_config(kernel, int(k[1:]), int(d[1:]), int(D[1:]), torch.float32, int(H[1:]),
                                   int(W[1:]), run=never_run)
    assert config == tuning._config_only(entry) and entry["ms"] == 0.0


def test_cli_without_gpu_or_interpreter_fails_clearly(tmp_path, monkeypatch, capsys):
    # In this process (a subprocess would only add the imports): no CUDA, interpreter off.
    from sasa_triton import autotune
    monkeypatch.setattr(autotune, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert autotune.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "TRITON_INTERPRET=1" in err
    assert not os.path.exists(os.environ["SASA_TRITON_CACHE_DIR"])


def test_cli_dispatcher(capsys, monkeypatch):
    from sasa_triton.__main__ import main
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "autotune" in out and "bench" in out and "inspect" in out
    assert main(["nope"]) == 2 and "unknown command" in capsys.readouterr().err
    seen = []
    from sasa_triton import autotune
    monkeypatch.setattr(autotune, "main", lambda argv: seen.append(argv) or 0)
    assert main(["autotune", "--dtypes", "bf16"]) == 0 and seen == [["--dtypes", "bf16"]]


def test_cli_dry_run_lists_the_pruned_spaces(capsys):
    from sasa_triton import autotune
    assert autotune.main(["--dry-run", "--dtypes", "bf16", "--shape", "32,56,56,8,64", "--kernel-size", "7"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("local_fwd/k7/d1/D64/bf16/H64/W64: ")
