"""The notebooks run top to bottom, headless, on a CPU (nbclient, kernel "python3")."""
import os

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = ("quickstart.ipynb", "throughput.ipynb")


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment for the notebook kernel: the repository importable, a python3 kernelspec found
    (installed into a temporary prefix when this Python has none), one torch thread."""
    from jupyter_client.kernelspec import KernelSpecManager

    saved = dict(os.environ)
    os.environ["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [saved.get("PYTHONPATH")] if p])
    os.environ["OMP_NUM_THREADS"] = "1"  # small ops; shared CI machines oversubscribe threads badly
    os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend, so plots land in the outputs
    if "python3" not in KernelSpecManager().find_kernel_specs():
        from ipykernel import kernelspec
        prefix = str(tmp_path_factory.mktemp("jupyter"))
        kernelspec.install(prefix=prefix, kernel_name="python3")
        os.environ["JUPYTER_PATH"] = os.pathsep.join([os.path.join(prefix, "share", "jupyter")]
                                                     + [p for p in [saved.get("JUPYTER_PATH")] if p])
    yield
    os.environ.clear()
    os.environ.update(saved)


def _run(path, cwd):
    nb = nbformat.read(path, as_version=4)
    assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), \
        f"{os.path.basename(path)} is stored with outputs; clear them before committing"
    client = nbclient.NotebookClient(nb, timeout=150, kernel_name="python3", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                     for out in cell.get("outputs", []) if out.get("output_type") == "stream")
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []))
    return text, images


def _checkout(tmp_path):
    """A stand-in repository root (its pyproject.toml ends the notebook's search for results)
    with a notebooks/ folder to run in."""
    root = tmp_path / "repo"
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    return root


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, kernel_env, tmp_path, monkeypatch):
    monkeypatch.delenv("SASA_BENCH_CSV", raising=False)
    root = _checkout(tmp_path)
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(private_tmp))  # the kernel's tempfile folder, checked below
    text, images = _run(os.path.join(ROOT, "notebooks", name), root / "notebooks")
    assert images >= 2, f"{name}: expected plots in the outputs, got {images}"
    if name == "quickstart.ipynb":
        assert "peak at offset (-1, -2)" in text
        assert "max |triton - reference|" in text
    else:
        # No saved results: the notebook ran its own benchmark and removed its temporary folder.
        assert "a small run of this notebook" in text
        assert not [p.name for p in private_tmp.iterdir() if p.name.startswith("sasa_bench_")]
        if not torch.cuda.is_available():
            assert "CPU (reference path)" in text, "a CPU benchmark run must be labelled as such"


def test_throughput_notebook_reads_the_repository_results(kernel_env, tmp_path, monkeypatch):
    # The README's command writes bench_out/ at the repository root; the notebook runs in
    # notebooks/ and must find it there (a small real run stands in for it).
    from sasa_triton import bench

    monkeypatch.delenv("SASA_BENCH_CSV", raising=False)
    root = _checkout(tmp_path)
    argv = ["--device", "cpu", "--quick", "--stages", "4", "--batch", "1", "--providers", "sasa", "conv3x3",
            "--no-models", "--no-plots", "--out", str(root / "bench_out")]
    assert bench.main(argv) == 0
    text, images = _run(os.path.join(ROOT, "notebooks", "throughput.ipynb"), root / "notebooks")
    assert f"rows from {root / 'bench_out' / 'results.csv'}" in text
    assert images >= 2
