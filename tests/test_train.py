"""`python -m sasa_triton.train`: the dataset, DDP on CPU (gloo), Triton-vs-reference training
losses under the interpreter, and a short run that learns the task."""
from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from sasa_triton import models
from sasa_triton.train import CLASSES, build_model, main, make_dataset, train_step

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
    result = main(["--epochs", "2", "--train-size", "2048", "--test-size", "512", "--batch-size", "32",
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
        main(["--train-size", "8", "--batch-size", "16", "--backend", "reference", "--device", "cpu", "--out", ""])
