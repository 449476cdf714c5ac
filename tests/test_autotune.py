"""Autotuning: the candidate space per window size, the lookup (memory, tuned files, defaults;
nothing tuned in the user's process), the tuned-file cache, the validation of candidates, the
tuner's child processes (a wrong candidate is rejected, a dying child costs only its candidate),
and `python -m sasa_triton.autotune` and bench/sweep_candidates.py under the interpreter.
"""
import json
import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch

from sasa_triton import autotune, tuning
from sasa_triton.autotune import LocalProblem, Task

from helpers import load_bench_script

KERNELS = ("local_fwd", "local_bwd_dq", "local_bwd_dkdv")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = (1, 6, 6, 1, 8)  # B, H, W, heads, D: a tiny local-attention key for the interpreter


def is_pow2(n):
    return n >= 1 and n & (n - 1) == 0


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test starts with an empty process cache and a private cache directory."""
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("SASA_TRITON_CONFIG_FILE", raising=False)
    monkeypatch.delenv("SASA_TRITON_AUTOTUNE", raising=False)
    tuning.clear_cache()
    yield
    tuning.clear_cache()


# ----------------------------------------------------------------------------------------------
# (a) The config space
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel_size", range(3, 16, 2), ids=lambda k: f"k{k}")
def test_config_space_valid_for_every_window(kernel_size):
    """What the tuner needs of a space (ops/local_attention.config_space owns the tiles): the
    default first, no duplicates, the default's fields (and the forward's optional
    HEADS_PER_PROGRAM) only, something to tune."""
    for head_dim in (8, 16, 32, 64, 128):
        for dtype in DTYPES:
            for kernel in KERNELS:
                for dilation, (H, W) in ((1, (56, 56)), (1, (7, 7)), (2, (28, 28)), (1, (2, 3))):
                    where = f"{kernel} k={kernel_size} d={dilation} D={head_dim} {dtype} {H}x{W}"
                    configs = tuning.candidate_configs(kernel, kernel_size, dilation, head_dim, dtype, H, W)
                    default = tuning.default_config(kernel, kernel_size, dilation, head_dim, dtype)
                    assert configs[0] == default, where
                    assert len(configs) == len({json.dumps(c, sort_keys=True) for c in configs}), where
                    if min(H, W) >= 7:
                        assert len(configs) > 1, f"nothing to tune beyond the default: {where}"
                    for config in configs[1:]:
                        optional = {"HEADS_PER_PROGRAM"} if kernel == "local_fwd" else set()
                        assert set(default) <= set(config) <= set(default) | optional, where  # what the launcher reads
                        assert all(isinstance(v, int) and v >= 1 for v in config.values()), where
                        assert config["num_warps"] in (1, 2, 4, 8) and config["num_stages"] in (1, 2, 3), where


def test_config_space_depends_on_window_size():
    def tiles(k):
        return {json.dumps(c, sort_keys=True) for c in tuning.candidate_configs("local_fwd", k, 1, 64,
                                                                                torch.bfloat16, 56, 56)}
    assert tiles(3) != tiles(15)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's defaults")
def test_gpu_default_config_is_asked_for_explicitly():
    # The stem's defaults shrink under the interpreter; gpu_default_config gives the GPU's there too.
    for kernel in ("spatial_block_fwd", "spatial_sliding_bwd_dkdv"):
        gpu = tuning.gpu_default_config(kernel, 4, 1, 16, torch.bfloat16)
        assert tuning.default_config(kernel, 4, 1, 16, torch.bfloat16) != gpu  # conftest: interpreter on
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(tuning, "interpreter_enabled", lambda: False)
            assert tuning.default_config(kernel, 4, 1, 16, torch.bfloat16) == gpu
    assert tuning.gpu_default_config("spatial_block_fwd", 4, 1, 16, torch.bfloat16)["TILES_PER_PROGRAM"] == 8


# ----------------------------------------------------------------------------------------------
# (b) Keys, lookup, tuned files
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
    assert tuning.parse_key(key) == {"kernel": "local_fwd", "kernel_size": 7, "dilation": 1, "head_dim": 64,
                                     "dtype": "bf16", "height": 64, "width": 64}
    with pytest.raises(ValueError, match="key"):
        tuning.parse_key("local_fwd/k7")


def never_run(config):
    raise AssertionError("run() must never be called: nothing is tuned in the user's process")


def tuned(kernel="local_fwd"):
    """A config of the kernel's own fields that differs from its default."""
    default = tuning.default_config(kernel, 7, 1, 32, torch.float32)
    return {**default, "num_warps": 2 if default["num_warps"] != 2 else 4, "num_stages": 2}


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


def test_tuned_file_round_trip():
    path = tuning.save_tuned(None, {key56(): {**tuned(), "ms": 0.5, "default_ms": 0.7, "timed": 9,
                                              "rejected": [{"config": {"BLOCK_H": 1}, "reason": "mismatch: y"}]}})
    assert path == tuning.tuned_file() and path.startswith(os.environ["SASA_TRITON_CACHE_DIR"])
    data = json.load(open(path))
    assert data["gpu"] == tuning.device_name() and data["triton"] == tuning.triton_version()
    assert data["kernel_hashes"] == {"local": tuning.kernel_source_hash("local")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Another image size in the same bucket, any batch: the stored config (bookkeeping dropped).
        assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 60, 49, run=never_run) == tuned()
    # Other keys are not in the file: the default.
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 28, 28) == \
        tuning.default_config("local_fwd", 7, 1, 32, torch.float32)
    # save_tuned merges with the file already there.
    tuning.save_tuned(None, {key56("local_bwd_dq"): tuned("local_bwd_dq")})
    assert set(json.load(open(path))["configs"]) == {key56(), key56("local_bwd_dq")}


def test_explicit_file_has_priority_over_the_cache_directory(tmp_path, monkeypatch):
    write_file(tuning.tuned_file(), {key56(): {**tuned(), "num_warps": 8}})
    explicit = str(tmp_path / "mine.json")
    write_file(explicit, {key56(): tuned()})
    monkeypatch.setenv("SASA_TRITON_CONFIG_FILE", explicit)
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56) == tuned()


def test_autotune_0_means_default_configs_only(monkeypatch):
    write_file(tuning.tuned_file(), {key56(): tuned()})
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "0")
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56) == \
        tuning.default_config("local_fwd", 7, 1, 32, torch.float32)
    monkeypatch.setenv("SASA_TRITON_AUTOTUNE", "1")
    tuning.clear_cache()
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56) == tuned()


def test_lookup_is_memory_only_after_the_first_call():
    """After the first call per key: no file, environment or default computation, and callers
    get a copy (changing it does not change the cache)."""
    expected = tuned()
    write_file(tuning.tuned_file(), {key56(): expected})
    first = tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56)
    first["num_warps"] = 99

    def boom(*args, **kwargs):
        raise AssertionError("looked up again")
    with pytest.MonkeyPatch.context() as patch:
        for name in ("tuned_entries", "default_config", "read_tuned_file", "config_files", "tuned_configs_enabled"):
            patch.setattr(tuning, name, boom)
        patch.setattr(os.environ, "get", boom)
        assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56, run=never_run) == expected
    os.remove(tuning.tuned_file())
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56) == tuned()  # still in memory
    tuning.clear_cache()
    assert tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56) == \
        tuning.default_config("local_fwd", 7, 1, 32, torch.float32)


# (ids avoid the word "gpu": conftest skips tests with that keyword when there is no GPU)
@pytest.mark.parametrize("stale", ["other-device", "other-triton", "other-kernels"])
def test_stale_file_is_ignored_with_a_warning(stale):
    kwargs = {"other-device": {"gpu": "NVIDIA A100-SXM4-80GB"}, "other-triton": {"triton": "2.0.0"},
              "other-kernels": {"hashes": {"local": "0123456789abcdef"}}}
    write_file(tuning.tuned_file(), {key56(): tuned()}, **kwargs[stale])
    with pytest.warns(UserWarning, match="ignoring") as record:
        config = tuning.get_config("local_fwd", 7, 1, 32, torch.float32, 56, 56)
    assert config == tuning.default_config("local_fwd", 7, 1, 32, torch.float32)
    assert len(record) == 1 and "\n" not in str(record[0].message)


def test_kernel_hash_covers_the_jit_sources():
    h = tuning.kernel_source_hash("local")
    assert h and len(h) == 16 and h == tuning.kernel_source_hash("local")
    assert h != tuning.kernel_source_hash("spatial")
    assert tuning.kernel_source_hash("nonexistent") is None


# ----------------------------------------------------------------------------------------------
# (c) Validation of a candidate's outputs
# ----------------------------------------------------------------------------------------------

def test_compare_accepts_rounding_noise_and_rejects_wrong_elements():
    gen = torch.Generator().manual_seed(0)
    expected = torch.randn(4, 8, 8, 2, 16, generator=gen)
    # One bf16 ulp (2^-8 relative) on a third of the elements: another summation order.
    flips = (torch.rand(expected.shape, generator=gen) < 0.33).float() * torch.sign(torch.randn(expected.shape,
                                                                                                  generator=gen))
    noisy = expected * (1 + flips * 2.0 ** -8)
    reason, rel_rms = autotune.compare("y", noisy, expected, autotune.tolerance("bf16", torch.bfloat16))
    assert reason is None and 0 < rel_rms < 5e-3
    # One element of 8192 off by a fifth of the RMS: passes an RMS check, not the per-element one.
    wrong = expected.clone()
    wrong[1, 2, 3, 0, 5] += 0.2 * expected.pow(2).mean().sqrt()
    reason, _ = autotune.compare("y", wrong, expected, autotune.tolerance("bf16", torch.bfloat16))
    assert reason is not None and "1 of 8192 elements off" in reason and "[1, 2, 3, 0, 5]" in reason
    # An unwritten (NaN-poisoned) element.
    unwritten = expected.clone()
    unwritten[0, 0, 0, 1, 0] = float("nan")
    reason, _ = autotune.compare("dq", unwritten, expected, autotune.tolerance("fp32", torch.float32))
    assert "1 of 8192 values not finite" in reason
    # A small error on every element: within the per-element bound, over the RMS bound.
    drift = expected * (1 + 0.003)
    reason, _ = autotune.compare("dk", drift, expected, autotune.tolerance("fp16", torch.float16))
    assert reason is not None and "relative RMS error" in reason


def test_fp32_outputs_of_16_bit_inputs_get_a_tighter_tolerance():
    """lse is fp32 (values ~10): a bf16 tolerance would let a shift of 0.04 through."""
    lse = 10 + torch.randn(2, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    assert autotune.compare("lse", lse + 0.04, lse, autotune.TOLERANCE["bf16"])[0] is None
    assert autotune.compare("lse", lse + 0.04, lse, autotune.tolerance("bf16", torch.float32))[0] is not None
    assert autotune.tolerance("fp32", torch.float32) == autotune.TOLERANCE["fp32"]


def test_prune_reason_from_compiled_facts():
    assert autotune.prune_reason({"registers": 128, "spills": 0, "shared_mem": 1024}) is None
    assert "spills 48 bytes" in autotune.prune_reason({"registers": 255, "spills": 48, "shared_mem": 0})
    assert "does not compile" in autotune.prune_reason({"error": "OutOfResources: shared memory"})


def test_parallel_compiles_survive_a_failing_compile():
    """Triton 3.6 left its AsyncCompileMode active when a compile had failed, and every later key
    of the child then failed (seen on an H200): the mode must end with the block, silently."""
    _async_compile = pytest.importorskip("triton.runtime._async_compile")

    def fail():
        raise RuntimeError("PassManager::run failed")
    for _ in range(2):
        with autotune._parallel_compiles(2):
            mode = _async_compile.active_mode.get()
            assert mode is not None
            # submit(key, compile_fn, finalize_fn[, cleanup_fn]): the cleanup callback came after 3.6.
            callbacks = [lambda kernel: None, lambda future: None]
            n_callbacks = len(inspect.signature(mode.submit).parameters) - 2
            mode.submit("key", fail, *callbacks[:n_callbacks])
        assert _async_compile.active_mode.get() is None


# ----------------------------------------------------------------------------------------------
# (d) The tuner: child processes, rejected candidates, faults (interpreter, tiny shapes)
# ----------------------------------------------------------------------------------------------

def fp32_default(kernel="local_fwd", kernel_size=3):
    return tuning.default_config(kernel, kernel_size, 1, TINY[-1], torch.float32)


def other_launch(kernel="local_fwd", **change):
    """A candidate that differs from the default in launch fields only (same tiles: cheap to run)."""
    default = fp32_default(kernel)
    return {**default, "num_warps": 2 if default["num_warps"] != 2 else 4, **change}


class WrongAnswerProblem(LocalProblem):
    """The launch of a config with num_stages == 2 returns a y with one wrong element, and
    pretends to be the fastest; one with num_stages == 3 writes into its input q."""

    def run(self, config, fill=True):
        out = super().run(config, fill)
        if config["num_stages"] == 2 and "y" in out:
            out["y"][0, 1, 2, 0, 3] += 1.0
        if config["num_stages"] == 3:
            self.q[0, 0, 0, 0, 0] += 1.0
        return out

    def time(self, config):
        return 0.1 if config["num_stages"] == 2 else (1.0 if config == self.default("local_fwd") else 0.5)


def test_tuner_rejects_a_wrong_candidate_and_keeps_the_fastest_right_one():
    good, bad, writer = other_launch(), other_launch(num_stages=2), other_launch(num_stages=3)
    task = Task("local_fwd", 3, 1, TINY, "fp32", candidates=[bad, writer, good])
    [result] = autotune.tune([task], problem=WrongAnswerProblem)
    assert result.error is None
    assert [result.results[i]["status"] for i in range(4)] == ["accepted", "mismatch", "mismatch", "accepted"]
    assert "elements off" in result.results[1]["reason"] and "[0, 1, 2, 0, 3]" in result.results[1]["reason"]
    assert "wrote outside its outputs (changed zeros.input0" in result.results[2]["reason"]
    entry = result.entry()
    assert tuning.entry_config(entry) == good and entry["ms"] == 0.5 and entry["default_ms"] == 1.0
    assert entry["rejected"] == [{"config": c, "reason": "mismatch: " + result.results[i]["reason"]}
                                 for i, c in ((1, bad), (2, writer))]
    # What the file holds is what the launchers then get.
    tuning.save_tuned(None, {result.key: entry})
    assert tuning.get_config("local_fwd", 3, 1, TINY[-1], torch.float32, 6, 6) == good


class DyingProblem(LocalProblem):
    """The child process dies while it runs a config with num_stages == 2 (as a CUDA fault would
    take it down), or while preparing any kernel_size-5 key."""

    def _setup(self):
        if self.task.kernel_size == 5:
            os._exit(9)
        super()._setup()

    def run(self, config, fill=True):
        if config["num_stages"] == 2:
            os._exit(7)
        return super().run(config, fill)


def test_a_dying_child_costs_only_its_candidate():
    dying, good = other_launch(num_stages=2), other_launch()
    tasks = [Task("local_fwd", 3, 1, TINY, "fp32", candidates=[dying, good]),
             Task("local_fwd", 5, 1, TINY, "fp32", candidates=[good])]
    lines = []
    # compile_ahead=False: the parallel compile pass also calls run() (launches stubbed, where no
    # real fault can happen), and DyingProblem would die there instead.
    first, second = autotune.tune(tasks, problem=DyingProblem, log=lines.append, compile_ahead=False)
    # The fault is recorded, the remaining candidate ran in a fresh child, the key is tuned.
    assert first.results[1]["status"] == "fault" and "exit code 7" in first.results[1]["reason"]
    assert first.results[2]["status"] == "accepted" and first.error is None
    assert first.entry()["rejected"][0]["config"] == dying
    # A key whose child dies before its default ran keeps the default: no entry, an error logged.
    assert second.entry() is None and "exit code 9" in second.error
    assert any("fresh child" in line for line in lines) and any("keeps its default" in line for line in lines)


@pytest.mark.gpu
def test_tune_on_cuda_compiles_prunes_validates_and_times():
    task = Task("local_fwd", 7, 1, (4, 14, 14, 8, 32), "bf16", max_candidates=6)
    [result] = autotune.tune([task])
    assert result.error is None, result.error
    ran = [r for r in result.results.values() if r["status"] != "pruned"]
    assert all(r.get("registers") for r in ran) and result.results[0]["ms"] > 0
    assert result.entry() is not None


# ----------------------------------------------------------------------------------------------
# (e) The command and the candidate sweep
# ----------------------------------------------------------------------------------------------

def run_cli(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(SASA_TRITON_CACHE_DIR=str(tmp_path / "cli-cache"), CUDA_VISIBLE_DEVICES="", TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-m", "sasa_triton", "autotune", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cli_under_interpreter_writes_a_loadable_file(tmp_path, monkeypatch):
    proc = run_cli([], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = proc.stdout.strip().splitlines()[-1]
    assert path == str(tmp_path / "cli-cache" / "triton-interpreter.json")
    data = json.load(open(path))
    assert data["gpu"] == "triton-interpreter" and data["triton"] == tuning.triton_version()
    assert sorted(data["configs"]) == sorted(t.key for t in autotune.default_tasks(
        autotune.build_parser().parse_args([]), interpret=True))
    assert {tuning.family_name(k) for k in data["configs"]} == {"local", "spatial"}
    assert "[6/6]" in proc.stderr and "s left" in proc.stderr
    # This process loads it and the launchers get the stored configs.
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "cli-cache"))
    tuning.clear_cache()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key, entry in data["configs"].items():
            f = tuning.parse_key(key)
            config = tuning.get_config(f["kernel"], f["kernel_size"], f["dilation"], f["head_dim"],
                                       tuning.DTYPES[f["dtype"]], f["height"], f["width"])
            assert config == tuning.entry_config(entry) and entry["ms"] is None
    # A second run finds every key in the file and tunes nothing.
    again = run_cli([], tmp_path)
    assert again.returncode == 0 and "6 keys already in" in again.stderr and "0 keys" in again.stderr


def test_cli_writes_each_key_as_it_finishes(tmp_path, monkeypatch):
    """A run stopped after its first key (Ctrl-C, a time limit) leaves that key in the file."""
    out = tmp_path / "tuned.json"
    monkeypatch.setenv("SASA_TRITON_CACHE_DIR", str(tmp_path / "cache"))

    def stopped_after_one_key(tasks, on_key, **_):
        result = autotune.KeyResult(tasks[0], tasks[0].configs())
        result.results[0] = {"status": "accepted", "reason": None, "ms": 0.5, "errors": {}}
        on_key(result)
        assert json.load(open(out))["configs"].keys() == {tasks[0].key}  # on disk before the next key
        raise KeyboardInterrupt

    monkeypatch.setattr(autotune, "tune", stopped_after_one_key)
    with pytest.raises(KeyboardInterrupt):
        autotune.main(["--output", str(out), "--no-stem"])
    tuning.clear_cache()
    data = tuning.read_tuned_file(str(out))
    assert data is not None and len(data["configs"]) == 1


def test_cli_without_gpu_or_interpreter_fails_clearly(monkeypatch, capsys):
    monkeypatch.setattr(autotune, "interpreter_enabled", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert autotune.main([]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "TRITON_INTERPRET=1" in err
    assert not os.path.exists(os.environ["SASA_TRITON_CACHE_DIR"])


def test_cli_dispatcher_passes_its_name(capsys):
    from sasa_triton.__main__ import main
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(autotune, "main", lambda argv, prog=None: seen.append((argv, prog)) or 0)
        assert main(["autotune", "--dtypes", "bf16"]) == 0
    assert seen == [(["--dtypes", "bf16"], "sasa-triton autotune")]
    with pytest.raises(SystemExit) as stop:
        autotune.main(["--help"], prog="sasa-triton autotune")
    assert stop.value.code == 0 and "usage: sasa-triton autotune" in capsys.readouterr().out


def test_cli_dry_run_lists_the_keys(capsys):
    assert autotune.main(["--dry-run", "--dtypes", "bf16", "fp16", "--shapes", "32,56,56,8,64",
                          "--kernel-sizes", "7", "11"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 * 2 * 3 and lines[0].startswith("local_fwd/k7/d1/D64/bf16/H64/W64: ")
    default = autotune.default_tasks(autotune.build_parser().parse_args([]), interpret=False)
    assert [t.shape for t in default if t.kernel == "local_fwd"] == [
        (32, 56, 56, 8, 8), (32, 28, 28, 8, 16), (32, 14, 14, 8, 32), (32, 7, 7, 8, 64)]
    assert {t.kernel_size for t in default if t.kernel.startswith("local")} == {7}
    assert [t.shape for t in default if t.kernel == "spatial_block_fwd"] == [(32, 224, 224, 4, 16)]


def load_sweep():
    return load_bench_script("sweep_candidates")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's tiny keys")
def test_sweep_candidates_runs_each_candidate_in_its_own_child(tmp_path, capsys):
    sweep = load_sweep()
    code = sweep.main(["--out", str(tmp_path), "--kernels", "local_fwd", "--max-candidates", "2", "--isolate"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert out.out.strip().splitlines()[-1] == "1 configs, 0 mismatches, 0 faults, 0 errors, 0 keys failed"
    data = json.load(open(tmp_path / "sweep.json"))
    [key] = data["keys"]
    assert key["key"].startswith("local_fwd/k3/") and [c["status"] for c in key["candidates"]] == ["accepted"] * 2
    assert "fresh child" in out.err  # --isolate: the candidate after the default ran in a new process
    assert "1 configs, 0 mismatches" in open(tmp_path / "sweep.md").read()
