"""The op's direct kernel launches (sasa_triton._library.KernelLaunch) pass Triton's compiled
kernels exactly what Triton's own JITFunction.run passes them.

Without a GPU: bench/launch_overhead.py --check compiles the three local-attention kernels for
sm_90 behind a stand-in CUDA driver whose launcher records each call, and compares the direct
launches with Triton's (same compiled kernel, same tensors, grid, stream, function and metadata),
also across a change of specialization (a table's dtype, a misaligned tensor). With a GPU the
whole suite runs on the direct launches.

Also here, the other Triton-version shim of sasa_triton._library: its fix of Triton 3.3-3.6's
interpreter under numpy >= 2.4.
"""
import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch

import sasa_triton._library as library

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_direct_launches_pass_what_triton_passes():
    from sasa_triton._compile import toolchain_missing

    why_not = toolchain_missing()
    if why_not:
        pytest.skip(why_not)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SASA_TRITON_DIRECT_LAUNCH")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "launch_overhead.py"), "--check"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "all checks passed" in proc.stdout
    assert proc.stdout.count("ok   ") >= 16, proc.stdout


def test_direct_launch_switch():
    """Direct launches are on unless switched off, on a Triton whose launcher calls were checked
    (or switched on), and never without compiled kernels (the interpreter) or on the opt-in
    triton_op path (whose launches torch.compile traces)."""
    assert library.DIRECT_LAUNCH == library._direct_launch(os.environ.get("SASA_TRITON_DIRECT_LAUNCH", ""))
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert not library.DIRECT_LAUNCH


@pytest.mark.parametrize("version, setting, expected", [
    ((3, 3), "", True), ((3, 9), "", True), ((3, 9), "0", False), ((3, 9), " Off", False), ((3, 9), "1", True),
    ((3, 2), "", False), ((3, 10), "", False), ((4, 0), "", False), ((3, 10), "1", True), ((3, 10), "yes", True),
])
def test_direct_launches_only_on_checked_tritons(version, setting, expected, monkeypatch):
    """A direct launch hands the launcher Triton's internal argument order: by default only on the
    Tritons bench/launch_overhead.py --check passed on (DIRECT_LAUNCH_TRITONS), else through
    Triton's run unless SASA_TRITON_DIRECT_LAUNCH=1; off under the interpreter and on the triton_op
    path whatever the setting."""
    monkeypatch.setattr(library, "TRITON_VERSION", version)
    monkeypatch.setattr(library, "_INTERPRET", False)
    monkeypatch.setattr(library, "_USE_TRITON_OP", False)
    assert library._direct_launch(setting) is expected
    monkeypatch.setattr(library, "_INTERPRET", True)
    assert library._direct_launch(setting) is False
    monkeypatch.setattr(library, "_INTERPRET", False)
    monkeypatch.setattr(library, "_USE_TRITON_OP", True)
    assert library._direct_launch(setting) is False


def test_direct_launch_setting_is_checked():
    with pytest.raises(ValueError, match="SASA_TRITON_DIRECT_LAUNCH must be 0 or 1"):
        library._direct_launch("sometimes")


@pytest.mark.parametrize("direct", [True, False])
def test_launches_run_on_their_tensors_device(direct, monkeypatch):
    """Triton launches on the current device: a launch on tensors of another device runs under
    torch.cuda.device of theirs (and the current device is restored); on the current device, or
    for CPU tensors (device -1), the current device is left as it is. A stand-in driver and
    kernel record the device each launch sees."""
    current, seen = [0], []

    @contextlib.contextmanager
    def device_guard(index):
        before, current[0] = current[0], index
        try:
            yield
        finally:
            current[0] = before

    driver = types.SimpleNamespace(get_current_device=lambda: current[0], get_current_stream=lambda device: 0)
    monkeypatch.setattr(library, "_driver", types.SimpleNamespace(active=driver))
    monkeypatch.setattr(torch.cuda, "device", device_guard)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(library, "DIRECT_LAUNCH", direct)

    class Kernel:
        pre_run_hooks = []

        def __getitem__(self, grid):
            return lambda *args, **meta: seen.append(current[0])

    for device in (1, 0, -1, 2):
        library.KernelLaunch(Kernel(), (1,), {}, device)([torch.zeros(1), 3])
    assert seen == [1, 0, 0, 2] and current == [0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_op_on_another_device_than_the_current_one():
    """The op on cuda:1 while cuda:0 is current computes bitwise what it computes with cuda:1
    current (forward and every gradient)."""
    import sasa_triton

    gen = torch.Generator(device="cuda:1").manual_seed(0)
    qkv = torch.randn(2, 13, 11, 3, 4, 32, device="cuda:1", generator=gen).to(torch.bfloat16)
    tables = [torch.randn(7, 16, device="cuda:1", generator=gen) for _ in range(2)]
    dy = torch.randn(2, 13, 11, 4, 32, device="cuda:1", generator=gen).to(torch.bfloat16)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (*qkv.unbind(3), *tables)]
        y = sasa_triton.local_attention2d(*leaves, kernel_size=7)
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    with torch.cuda.device(1):
        expected = run()
    with torch.cuda.device(0):
        got = run()
        torch.cuda.synchronize(1)
    for name, a, b in zip(("y", "dq", "dk", "dv", "drel_rows", "drel_cols"), got, expected):
        assert torch.equal(a, b), name


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_direct_launches_compute_what_triton_launches_compute(dtype, monkeypatch):
    """On the card: the op's forward and every gradient, launched directly (the second call of a
    shape on), are bitwise those of launches through Triton's run (the kernels are deterministic)."""
    import sasa_triton

    if not library.DIRECT_LAUNCH:
        pytest.skip("direct launches are off (SASA_TRITON_DIRECT_LAUNCH=0, SASA_TRITON_TRITON_OP=1 or a Triton "
                    "not in DIRECT_LAUNCH_TRITONS)")
    dtype = getattr(torch, dtype)
    gen = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, 13, 11, 3, 4, 32, device="cuda", generator=gen).to(dtype)
    tables = [torch.randn(7, 16, device="cuda", generator=gen) for _ in range(2)]
    dy = torch.randn(2, 13, 11, 4, 32, device="cuda", generator=gen).to(dtype)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (*qkv.unbind(3), *tables)]
        y = sasa_triton.local_attention2d(*leaves, kernel_size=7)
        return [y.detach(), *torch.autograd.grad(y, leaves, dy)]

    run()  # the first launch of each kernel goes through Triton and keeps the compiled kernel
    direct = run()
    monkeypatch.setattr(library, "DIRECT_LAUNCH", False)
    through_triton = run()
    for name, a, b in zip(("y", "dq", "dk", "dv", "drel_rows", "drel_cols"), direct, through_triton):
        assert torch.equal(a, b), name


class _Scope:
    """Triton 3.6's _LangPatchScope: sets attributes and undoes them in reverse order."""
    def __init__(self):
        self.changes = []

    def set_attr(self, obj, name, value):
        self.changes.append((obj, name, obj.__dict__.get(name)))
        setattr(obj, name, value)

    def restore(self):
        while self.changes:
            obj, name, original = self.changes.pop()
            setattr(obj, name, original) if original is not None else delattr(obj, name)


@pytest.mark.parametrize("with_scope", [False, True], ids=["triton-3.3-3.5", "triton-3.6"])
def test_interpreter_index_fix(with_scope):
    """fix_interpreter_index makes a scalar's int() take its one-element array squeezed (Triton
    3.7's fix of issue 9171), on top of the interpreter's own patching, in both of its forms
    (3.3-3.5 set the attribute; 3.6 through a scope that undoes it after the launch); once."""
    import numpy

    class Handle:
        data = numpy.array([7], dtype=numpy.int32)  # a scalar's data, as the interpreter holds it

    class Tensor:
        handle = Handle()

    def refused(self):  # int() of the 1-d array, as numpy >= 2.4 answers it
        if self.handle.data.ndim:
            raise TypeError("only 0-dimensional arrays can be converted to Python scalars")
        return int(self.handle.data)

    def original(tensor, *scope):  # the interpreter's own patch
        scope[0].set_attr(tensor, "__index__", refused) if scope else setattr(tensor, "__index__", refused)
        tensor.patched = True

    interpreter = types.SimpleNamespace(_patch_lang_tensor=original)
    assert library.fix_interpreter_index(interpreter)
    assert not library.fix_interpreter_index(interpreter)  # already fixed: not wrapped twice
    scope = _Scope()
    interpreter._patch_lang_tensor(Tensor, *([scope] if with_scope else []))
    assert Tensor.patched and range(10)[Tensor()] == 7 and Tensor().__index__() == 7
    if with_scope:
        scope.restore()
        assert "__index__" not in Tensor.__dict__
    assert not library.fix_interpreter_index(types.SimpleNamespace())  # no such interpreter function: nothing
