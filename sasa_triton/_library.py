"""Registration of the fused ops with torch.library, so torch.compile traces them without graph
breaks and fake tensors (torch.export, shape propagation) work.

Default: an op defined with torch.library's low-level API (`Library.define` with the schema
`custom_op` would infer, one CompositeExplicitAutograd kernel) with a registered fake kernel and
autograd: what `torch.library.custom_op` registers, without the Python it wraps around every
call (an aliasing check of the outputs among it): through the local ops' OpOverloads, as
torch.compile's graphs call them per layer, 15 % fewer host instructions per forward call and
20 % per backward call (bench/RESULTS.md, 2026-11-30).
Inductor treats it as one opaque extern call, which is all the fused kernels need (there is
nothing to fuse into them). SASA_TRITON_TRITON_OP=1 registers them as `torch.library.triton_op` + `wrap_triton`
instead, so Inductor sees the Triton launches; that path is opt-in until it has been verified on
a GPU (it cannot be exercised here: tracing wrap_triton needs a CUDA driver). Under
TRITON_INTERPRET=1 it is never used (wrap_triton rejects interpreted kernels on some versions).
"""
from __future__ import annotations

import os
import re

import torch
import triton
from triton.compiler import CompiledKernel as _CompiledKernel
from triton.runtime import driver as _driver

from ._utils import interpreter_enabled

_INTERPRET = interpreter_enabled()
_USE_TRITON_OP = os.environ.get("SASA_TRITON_TRITON_OP", "0") == "1" and not _INTERPRET


def define_op(name: str):
    """Decorator registering a functional (non-mutating) op under `name`."""
    def decorator(fn):
        if _USE_TRITON_OP:
            return torch.library.triton_op(name, mutates_args=())(fn)
        return _Op(name, fn)
    return decorator


_LIBRARIES: dict = {}  # namespace -> its torch.library.Library (registrations live as long as it)


class _Op:
    """A functional op "namespace::name" from fn's signature: called like fn (through its
    OpOverload), with `register_fake` and `register_autograd` as custom_op's."""

    def __init__(self, qualname: str, fn):
        namespace, name = qualname.split("::")
        library = _LIBRARIES.get(namespace)
        if library is None:
            library = _LIBRARIES[namespace] = torch.library.Library(namespace, "FRAGMENT")
        library.define(name + torch.library.infer_schema(fn, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        library.impl(name, fn, "CompositeExplicitAutograd")
        self.qualname = qualname
        self.overload = getattr(getattr(torch.ops, namespace), name).default

    def __call__(self, *args):
        return self.overload(*args)

    def register_fake(self, fn):
        torch.library.register_fake(self.qualname)(fn)
        return fn

    def register_autograd(self, backward, setup_context=None):
        torch.library.register_autograd(self.qualname, backward, setup_context=setup_context)


def differentiable_backward(reference, inputs, dy) -> list:
    """The gradients of reference(*inputs) (an op's PyTorch reference) against dy, as a graph of
    PyTorch ops (create_graph): an op's backward takes this where it runs with grad enabled, which
    is autograd's create_graph=True (a gradient penalty, a double backward). The Triton backward's
    outputs have no graph: through them the second-order terms would be silently zero.
    None for each input that is None or does not require grad."""
    needed = [t for t in inputs if t is not None and t.requires_grad]
    grads = iter(torch.autograd.grad(reference(*inputs), needed, dy, create_graph=True, allow_unused=True)
                 if needed else ())
    return [next(grads) if t is not None and t.requires_grad else None for t in inputs]


# Options every launch of the package's kernels passes (and the static compiles in _compile.py).
# Fused multiply-adds: the default of Triton 3.3-3.9, under which the kernels were validated and
# their instruction counts measured; Triton 3.9 warns that its default turns them off in 3.10
# (measured: 3-4 % more SASS instructions without). Not on the opt-in triton_op path, whose
# wrap_triton takes only num_warps/num_stages-like options beside the kernel's arguments.
LAUNCH_OPTIONS = {} if _USE_TRITON_OP else {"enable_fp_fusion": True}

# The Tritons (major, minor) on which bench/launch_overhead.py --check found the direct launches
# passing a compiled kernel's launcher what Triton's own launch passes (2026-11-30: 3.3.1, 3.4.0,
# 3.5.1, 3.6.0, 3.7.1, 3.8.0 and 3.9.0). That launcher's arguments are Triton's internals: on a
# Triton not checked, they could come in an order it does not expect (a fault, or wrong results),
# so launches there go through Triton's run unless SASA_TRITON_DIRECT_LAUNCH=1 says otherwise.
DIRECT_LAUNCH_TRITONS = ((3, 3), (3, 4), (3, 5), (3, 6), (3, 7), (3, 8), (3, 9))
_version = re.match(r"(\d+)\.(\d+)", triton.__version__)
TRITON_VERSION = (int(_version[1]), int(_version[2])) if _version else (0, 0)  # (0, 0): a version it cannot read


def _direct_launch(setting: str) -> bool:
    """SASA_TRITON_DIRECT_LAUNCH: 0 (or false, off, no) off, 1 (true, on, yes) on, unset on where
    the Triton was checked; never under the interpreter (no compiled kernels) or on the opt-in
    triton_op path (torch.compile traces its launches)."""
    setting = setting.strip().lower()
    if setting not in ("", "0", "false", "off", "no", "1", "true", "on", "yes"):
        raise ValueError(f"SASA_TRITON_DIRECT_LAUNCH must be 0 or 1 (or unset: on where the Triton was "
                         f"checked), got {setting!r}")
    wanted = setting in ("1", "true", "on", "yes") or setting == "" and TRITON_VERSION in DIRECT_LAUNCH_TRITONS
    return wanted and not _USE_TRITON_OP and not _INTERPRET


# Launch compiled kernels directly after their first launch (KernelLaunch), else every launch
# through Triton's JITFunction.run.
DIRECT_LAUNCH = _direct_launch(os.environ.get("SASA_TRITON_DIRECT_LAUNCH", ""))


def fix_interpreter_index(interpreter) -> bool:
    """Triton 3.3-3.6's interpreter turns a scalar (a kernel's int argument, a program id) into
    a Python int, as a `range()` over it needs, by int() of its one-element 1-d array, which
    numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python scalars";
    triton-lang/triton issue 9171, fixed in 3.7). Every interpreted kernel with a
    runtime loop bound (the stems', spatial attention's) then fails. This applies 3.7's fix (int
    of the squeezed array) on top of the interpreter's own patching of `tl.tensor`, which it
    redoes (and on 3.6 undoes) around every interpreted launch. Returns whether it patched."""
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "index_fixed", False):
        return False

    def _patch_lang_tensor(tensor, *scope):
        original(tensor, *scope)
        index = lambda self: int(self.handle.data.squeeze())  # noqa: E731 (as 3.7's)
        if scope:  # 3.6: a scope that restores each attribute after the launch
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    _patch_lang_tensor.index_fixed = True
    interpreter._patch_lang_tensor = _patch_lang_tensor
    return True


def _numpy_refuses_array_to_int() -> bool:
    import warnings

    import numpy

    with warnings.catch_warnings():  # (numpy 1.25-2.3 warn)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            int(numpy.ones(1, dtype=numpy.int32))
        except TypeError:
            return True
    return False


if _INTERPRET and TRITON_VERSION < (3, 7) and _numpy_refuses_array_to_int():
    from triton.runtime import interpreter as _interpreter

    fix_interpreter_index(_interpreter)


class KernelLaunch:
    """Launches of one kernel with fixed constexprs, options and grid (one launch plan's).

    The first launch per argument specialization (the arguments' dtypes, alignments and ints, and
    the current device) goes through Triton, `kernel[grid](*args, **meta)`, which binds and
    specializes the arguments, finds or compiles the kernel, launches it and returns it. Later
    launches go straight to that compiled kernel's launcher with what Triton's run passes it: the
    runtime arguments, then the constexprs in parameter order, on the current stream. Without a
    launch hook set (a profiler's), they skip its runner (`compiled[grid]`, Triton 3.3-3.9), which
    builds a launch-metadata dict for the hooks on every launch and has the launcher call Triton's
    (empty) hook chains, and pass None for the three: 22-24 % fewer Python instructions per launch
    (bench/host_instructions.py --launches; bench/RESULTS.md 2026-11-30). Python per
    launch on a 2-core CPU VM: 18-23 us through Triton's run, 7-9 us through the runner
    (bench/launch_overhead.py, whose --check compares the launcher calls of the ways). Every
    launch goes through Triton under TRITON_INTERPRET=1, on the opt-in triton_op path, with
    Triton's pre-run or stage-inspection hooks set, while the kernel's run is replaced (the
    tuner's compile-only launches), with SASA_TRITON_DIRECT_LAUNCH=0, and on a Triton not in
    DIRECT_LAUNCH_TRITONS; a launch that returns no compiled kernel (under Triton's
    AsyncCompileMode) keeps nothing.

    `device`: the CUDA device index of the tensors launched on (-1: none, the interpreter's CPU
    tensors). Triton launches on the current device, so a launch on tensors of another device
    (cuda:1 while cuda:0 is current) runs under torch.cuda.device of theirs, as a PyTorch op's
    device guard would: on the current one it would read memory of another GPU, or fault, on a
    stream their next op does not wait for."""
    __slots__ = ("kernel", "grid", "meta", "device", "constexprs", "runners")

    def __init__(self, kernel, grid, meta, device: int = -1):
        self.kernel, self.grid = kernel, (*grid, *(1,) * (3 - len(grid)))  # the runner reads three
        self.meta = {**meta, **LAUNCH_OPTIONS}
        self.device = device
        self.constexprs = None
        self.runners = {}

    def __call__(self, args):
        if self.device >= 0 and not _USE_TRITON_OP and torch.cuda.current_device() != self.device:
            with torch.cuda.device(self.device):
                self(args)
            return
        kernel = self.kernel
        # (an instance attribute "run" replaces Triton's run: the tuner's compile-only launches)
        if not DIRECT_LAUNCH or "run" in kernel.__dict__ or kernel.pre_run_hooks or _stage_hook():
            launchable(kernel)[self.grid](*args, **self.meta)
            return
        # (the tensors' device is the current one now; -1: the stand-in driver's CPU tensors)
        device = self.device if self.device >= 0 else _driver.active.get_current_device()
        # What Triton specializes a compiled kernel on, or more: a tensor's dtype and whether its
        # address is a multiple of 16, a float's type (never its value), anything else's value.
        key = (device, *[(arg.dtype, not arg.data_ptr() & 15) if isinstance(arg, _Tensor) else arg
                         if type(arg) is int else float if type(arg) is float else (type(arg), arg) for arg in args])
        try:
            runner = self.runners.get(key)
        except TypeError:  # an argument that cannot be hashed: Triton decides
            runner = key = None
        if runner is not None:
            stream = _driver.active.get_current_stream(device)
            if _launch_hooks_set():
                runner[0](*args, *self.constexprs, stream=stream)
            else:
                runner[1](*self.grid, stream, *runner[2:], None, None, None, *args, *self.constexprs)
            return
        compiled = kernel[self.grid](*args, **self.meta)
        if not isinstance(compiled, _CompiledKernel):  # None (a hook declined) or a compile in flight
            return
        if self.constexprs is None:
            names = kernel.arg_names[len(args):]
            defaults = {p.name: p.default for p in kernel.params}
            self.constexprs = tuple(self.meta[name] if name in self.meta else defaults[name] for name in names)
        if key is not None and len(self.runners) < 64:
            # Triton's runner (it loads the module first), and what it hands the launcher: the
            # launcher, the function handle and the packed metadata, which a launch without launch
            # hooks passes on with None for the launch metadata and both hooks.
            runner = compiled[self.grid]
            self.runners[key] = (runner, compiled.run, compiled.function, compiled.packed_metadata)


_LAUNCHES: dict = {}


def launch(kernel, grid, args, meta) -> None:
    """kernel[grid](*args, **meta) through the KernelLaunch of (kernel, grid, meta), kept per key:
    for the ops without cached launch plans (the attention stem's)."""
    device = next((arg.get_device() for arg in args if isinstance(arg, _Tensor)), -1)
    try:  # (types too: 1, 1.0 and True are equal keys, not equal constexprs)
        key = (kernel, device, *grid, *[(name, value, type(value)) for name, value in meta.items()])
        kernel_launch = _LAUNCHES.get(key)
    except TypeError:  # a meta value that cannot be hashed
        key = kernel_launch = None
    if kernel_launch is None:
        kernel_launch = KernelLaunch(kernel, grid, meta, device)
        if key is not None:
            if len(_LAUNCHES) >= 4096:
                _LAUNCHES.clear()
            _LAUNCHES[key] = kernel_launch
    kernel_launch(args)


_Tensor = torch.Tensor
_RUNTIME_KNOBS = getattr(getattr(triton, "knobs", None), "runtime", None)  # Triton >= 3.4


def _stage_hook():
    return getattr(_RUNTIME_KNOBS, "add_stages_inspection_hook", None) is not None


def _launch_hooks_set() -> bool:
    """Whether a launch enter or exit hook is set (a profiler's): Triton 3.4-3.9 keep them as hook
    chains, empty by default, which its runner hands the launcher with a launch-metadata dict
    built per launch for them, and which the C launcher then calls; 3.3 keeps None."""
    hooks = _RUNTIME_KNOBS if _RUNTIME_KNOBS is not None else _CompiledKernel
    return _hook_set(hooks.launch_enter_hook) or _hook_set(hooks.launch_exit_hook)


def _hook_set(hook) -> bool:
    return hook is not None and getattr(hook, "calls", True) != []


def launchable(kernel):
    """The kernel as the registered op must launch it (wrapped for tracing when compiled)."""
    return torch.library.wrap_triton(kernel) if _USE_TRITON_OP else kernel


def attention_outputs(q: torch.Tensor, y=None, lse=None):
    """The forward outputs of an attention op with queries q (B, H, W, heads, D): y, contiguous
    like q, and one fp32 log-sum-exp per (pixel, head) as (B, heads, H, W). Given buffers (the
    tests poison them) are returned as they are."""
    B, H, W, heads, _ = q.shape
    if y is None:
        y = torch.empty_like(q, memory_format=torch.contiguous_format)
    if lse is None:
        lse = q.new_empty((B, heads, H, W), dtype=torch.float32)
    return y, lse


def autocast_inputs(*tensors):
    """Under autocast, float32 activations go to the autocast dtype (the relative tables, being
    parameters, stay as they are: the kernels read them in fp32)."""
    if not tensors or not torch._C._is_any_autocast_enabled():  # (one call where most run without autocast)
        return tensors
    device_type = tensors[0].device.type
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.dtype == torch.float32 else t for t in tensors)
