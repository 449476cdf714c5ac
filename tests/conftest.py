"""Test setup: without CUDA, every Triton kernel runs through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is decided here, first.
With CUDA present the kernels run compiled on the GPU and the `gpu` tests run too.

Which config runs is pinned for the whole session, before sasa_triton is imported: default
configs only (SASA_TRITON_AUTOTUNE=0: no tuned file is read) and a fresh private cache
directory, so a result never depends on a user's tuned file. Tests of the tuner set their own
environment. TF32 is off: fp32 comparisons mean fp32.
"""
import os
import shutil
import sys
import tempfile

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"
else:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

assert "sasa_triton" not in sys.modules, "sasa_triton was imported before tests/conftest.py pinned its configs"
os.environ["SASA_TRITON_AUTOTUNE"] = "0"
_CACHE_DIR = tempfile.mkdtemp(prefix="sasa_triton_test_cache_")
os.environ["SASA_TRITON_CACHE_DIR"] = _CACHE_DIR
os.environ.pop("SASA_TRITON_CONFIG_FILE", None)

sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def device():
    """Where the Triton kernels run: the GPU when present, else the CPU under the interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)
