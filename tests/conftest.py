"""Test setup: without CUDA, every Triton kernel runs through Triton's CPU interpreter.

TRITON_INTERPRET must be set before triton is imported, so it is decided here, first.
With CUDA present the kernels run compiled on the GPU and the `gpu` tests run too.
"""
import os
import sys

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    assert "triton" not in sys.modules, "triton was imported before tests/conftest.py set TRITON_INTERPRET"
    os.environ["TRITON_INTERPRET"] = "1"

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
