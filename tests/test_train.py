"""`python -m sasa_triton.train`: the dataset, DDP on CPU (gloo), Triton-vs-reference training
losses under the interpreter, a short run that learns the task, the device argument, autocast,
the `sasa-triton train` command; smoke runs on CUDA (gpu)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from sasa_triton import models
from sasa_triton.__main__ import main as dispatch
from sasa_triton.modules import SelfAttention2d
from sasa_triton.train import CLASSES, build_model, main, make_dataset, resolve_device, run, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _clean_env(**extra):
    """The environment of a subprocess: no TRITON_INTERPRET (the reference backend is explicit),
    one thread per process, the repo importable."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""), **extra)
    return env


def test_dataset_labels_follow_relative_position():
    images, labels = make_dataset(64, image_size=16, seed=3)
    assert images.shape == (64, 3, 16, 16) and images.dtype == torch.float32
    assert labels.shape == (64,) and set(labels.tolist()) <= set(range(len(CLASSES)))
    again_images, again_labels = make_dataset(64, image_size=16, seed=3)
    assert torch.equal(images, again_images) and torch.equal(labels, again_labels)

    def centre(channel):
        mask = (channel > 0.5).float()
        rows = torch.arange(channel.shape[0], dtype=torch.float32)
        return (mask.sum(1) * rows).sum() / mask.sum(), (mask.sum(0) * rows).sum() / mask.sum()

    clean, clean_labels = make_dataset(64, image_size=16, seed=3, noise=0.0)
    assert torch.equal(clean_labels, labels)
    for image, label in zip(clean, labels.tolist()):
        (sr, sc), (cr, cc) = centre(image[0]), centre(image[1])  # red square, green cross
        expected = {0: cc < sc, 1: cc > sc, 2: cr < sr, 3: cr > sr}[label]
        assert expected, (label, (sr, sc), (cr, cc))


def test_ddp_two_cpu_processes_keep_replicas_identical(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sasa_triton.train", "--epochs", "2", "--steps-per-epoch", "3", "--train-size", "256",
           "--test-size", "64", "--batch-size", "16", "--backend", "reference", "--device", "cpu",
           "--check-replicas", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    assert "max parameter difference across 2 rank(s) = 0" in proc.stdout
    assert proc.stdout.count("saved ") == 1  # rank 0 only
    ckpt = torch.load(out, weights_only=False)
    model = build_model(**ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    assert len(ckpt["history"]) == 2


def test_triton_and_reference_train_identically():
    """Three SGD steps of a tiny SASA ResNet through the Triton kernels (interpreter on CPU) and
    through the reference from the same initial weights: the losses agree step by step."""
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, labels = make_dataset(4, image_size=8, shape_size=2, seed=0)
    images, labels = images.to(device), labels.to(device)
    net = build_model(layers=(1,), base_width=4, heads=2, kernel_size=3, backend="reference").to(device)
    losses = {}
    for backend in ("reference", "triton"):
        model = models.set_backend(copy.deepcopy(net), backend)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        losses[backend] = [train_step(model, optimizer, images, labels)[0].item() for _ in range(3)]
    assert losses["reference"][-1] < losses["reference"][0]
    torch.testing.assert_close(torch.tensor(losses["triton"]), torch.tensor(losses["reference"]), rtol=1e-4, atol=0)


def test_short_reference_run_learns(tmp_path):
    out = tmp_path / "toy.pt"
    threads = torch.get_num_threads()
    result = run(["--epochs", "2", "--train-size", "2048", "--test-size", "512", "--batch-size", "32",
                   "--lr", "4e-3", "--backend", "reference", "--device", "cpu", "--threads", "1", "--quiet",
                   "--out", str(out)])
    assert torch.get_num_threads() == threads  # main() restores the thread count
    chance = 1 / len(CLASSES)
    assert result["test_acc"] > chance + 0.25, result["history"]
    ckpt = torch.load(out, weights_only=False)
    model = build_model(**ckpt["model_config"]).eval()
    model.load_state_dict(ckpt["model"])
    images, labels = make_dataset(256, seed=12345)
    with torch.no_grad():
        accuracy = (model(images).argmax(1) == labels).float().mean().item()
    assert accuracy > chance + 0.25


def test_bad_sizes():
    with pytest.raises(ValueError, match="image_size"):
        make_dataset(4, image_size=8, shape_size=3)
    with pytest.raises(ValueError, match="train-size"):
        run(["--train-size", "8", "--batch-size", "16", "--backend", "reference", "--device", "cpu"])


TINY_RUN = ["--epochs", "1", "--steps-per-epoch", "2", "--train-size", "64", "--test-size", "32", "--batch-size", "16",
            "--image-size", "12", "--quiet"]


@pytest.mark.parametrize("device_arg,local_rank,local_world_size,count,expected", [
    pytest.param(None, 0, 1, 0, "cpu", id="default-no-cuda"),
    pytest.param(None, 0, 1, 2, "cuda:0", id="default-cuda"),
    pytest.param(None, 1, 2, 2, "cuda:1", id="default-torchrun-rank1"),
    pytest.param("cpu", 0, 1, 2, "cpu", id="cpu"),
    pytest.param("cpu", 1, 2, 0, "cpu", id="cpu-torchrun"),
    pytest.param("cuda", 0, 1, 1, "cuda:0", id="cuda"),
    pytest.param("cuda", 1, 2, 2, "cuda:1", id="cuda-torchrun-rank1"),
    pytest.param("cuda:0", 0, 1, 1, "cuda:0", id="cuda:0"),
    pytest.param("cuda:1", 0, 1, 2, "cuda:1", id="cuda:1"),
])
def test_resolve_device(device_arg, local_rank, local_world_size, count, expected):
    device = resolve_device(device_arg, local_rank, local_world_size, cuda_device_count=count)
    assert device == torch.device(expected)
    assert device.type == "cpu" or device.index is not None  # what torch.cuda.set_device needs


@pytest.mark.parametrize("device_arg,local_rank,local_world_size,count,match", [
    pytest.param("gpu", 0, 1, 1, "--device must be cpu, cuda or cuda:N, got 'gpu'", id="name-gpu"),
    pytest.param("cuda:x", 0, 1, 1, "--device must be", id="bad-index"),
    pytest.param("meta", 0, 1, 1, "--device must be", id="meta"),
    pytest.param("cuda", 0, 1, 0, "no CUDA device", id="cuda-without-cuda"),
    pytest.param("cuda:2", 0, 1, 2, "cuda:2 does not exist", id="index-too-large"),
    pytest.param("cuda", 2, 3, 2, "cuda:2 does not exist", id="more-ranks-than-gpus"),
    pytest.param("cuda:0", 1, 2, 2, "all 2 processes of this node on one GPU", id="one-gpu-for-two-ranks"),
])
def test_resolve_device_rejects(device_arg, local_rank, local_world_size, count, match):
    with pytest.raises(ValueError, match=match):
        resolve_device(device_arg, local_rank, local_world_size, cuda_device_count=count)


def test_cli_bad_device_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--device", "gpu"])
    assert exit_info.value.code == 2
    assert "error: --device must be cpu, cuda or cuda:N" in capsys.readouterr().err


def test_dispatcher_runs_train_and_names_it(tmp_path, monkeypatch, capsys):
    """`sasa-triton train` runs the training, its --help says so, and nothing is written
    without --out."""
    with pytest.raises(SystemExit) as exit_info:
        dispatch(["train", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: sasa-triton train ")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m sasa_triton.train ")

    monkeypatch.chdir(tmp_path)
    assert dispatch(["train", *TINY_RUN, "--backend", "reference", "--device", "cpu"]) == 0
    assert "epoch 1/1" in capsys.readouterr().out
    assert os.listdir(tmp_path) == []
    out = tmp_path / "sub" / "toy.pt"
    assert dispatch(["train", *TINY_RUN, "--backend", "reference", "--device", "cpu", "--out", str(out)]) == 0
    assert sorted(os.listdir(tmp_path)) == ["sub"] and torch.load(out, weights_only=False)["args"]["out"] == str(out)


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_train_step_under_autocast(amp):
    """--amp: the attention runs in the autocast dtype, the parameters stay fp32 and change, and
    the loss is finite (fp16 through a gradient scaler)."""
    torch.manual_seed(0)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    images, labels = make_dataset(8, image_size=9, shape_size=2, seed=1)
    model = build_model(layers=(1,), base_width=4, heads=2, kernel_size=3, backend="reference")
    before = copy.deepcopy(model.state_dict())
    seen = []
    for m in model.modules():
        if isinstance(m, SelfAttention2d):
            m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu") if amp == "fp16" else None
    loss, _ = train_step(model, optimizer, images, labels, amp_dtype=amp_dtype, scaler=scaler)
    assert seen and set(seen) == {amp_dtype}
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "no parameter was updated"


def test_cli_amp_bf16_runs(capsys):
    result = run([*TINY_RUN, "--backend", "reference", "--device", "cpu", "--amp", "bf16"])
    assert "amp=bf16" in capsys.readouterr().out
    assert len(result["history"]) == 1 and torch.isfinite(torch.tensor(result["history"][0]["train_loss"]))


# --------------------------------------------------------------------------------------------
# CUDA smoke runs of the command line (each in a fresh process, as a user runs it)
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("command,extra", [
    pytest.param(["-m", "sasa_triton.train"], ["--device", "cuda"], id="train-cuda"),
    pytest.param(["-m", "sasa_triton.train"], ["--device", "cuda:0", "--amp", "bf16"], id="train-cuda0-bf16"),
    pytest.param(["-m", "sasa_triton", "train"], ["--device", "cuda", "--amp", "fp16"], id="dispatcher-cuda-fp16"),
])
def test_gpu_train_cli(tmp_path, command, extra):
    out = tmp_path / "toy.pt"
    cmd = [sys.executable, *command, *TINY_RUN, "--backend", "triton", "--out", str(out), *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 process(es) on cuda:0" in proc.stdout and "epoch 1/1" in proc.stdout
    ckpt = torch.load(out, weights_only=False, map_location="cpu")
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
    assert torch.isfinite(torch.tensor(ckpt["history"][0]["train_loss"]))


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_ddp_two_processes(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "sasa_triton.train", *TINY_RUN, "--device", "cuda", "--check-replicas"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_clean_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) on cuda:0" in proc.stdout
    assert "max parameter difference across 2 rank(s) = 0" in proc.stdout
