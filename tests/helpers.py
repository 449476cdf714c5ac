"""Shared test utilities: comparison against a float64 reference.

`assert_close` bounds the relative RMS error per dtype. `assert_close_to_reference` bounds the
error of every element by PyTorch's own error in the kernel's dtype on the same inputs (as
flash-attention's tests do); `reference_in_dtype` (the local op) and `results_in_dtype` (any
reference) compute that PyTorch result; `assert_close_everywhere` applies both bounds.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

# Relative RMS error allowed against a float64 reference, per input dtype (fp32 accumulation).
RMS_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}

# Unit roundoff (half the gap between 1 and the next number) of each dtype.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8,
                 torch.float64: 2.0 ** -53}


def _worst(err: torch.Tensor) -> tuple:
    flat = torch.argmax(err).item()
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, name: str = "") -> None:
    """Relative RMS error within the dtype's tolerance, no NaN/inf, and the same shape.

    On failure, reports the first index whose absolute error is the largest.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual64, expected64 = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual64).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(actual64))[:5].tolist()}"
    err = actual64 - expected64
    rms = err.pow(2).mean().sqrt().item()
    scale = expected64.pow(2).mean().sqrt().item() + 1e-30
    rel = rms / scale
    if rel > RMS_TOL[dtype]:
        idx = _worst(err.abs())
        raise AssertionError(
            f"{name}: relative RMS error {rel:.3e} > {RMS_TOL[dtype]:.1e} ({dtype}); worst at {idx}: "
            f"got {actual64[idx].item():.6g}, expected {expected64[idx].item():.6g}"
        )


# assert_close_to_reference: the kernel may be FACTOR times as wrong as PyTorch in the same dtype,
# per element and in RMS, plus ATOL_UNITS[dtype] unit roundoffs of (the output's RMS + the
# element's size) per element (where PyTorch's error happens to be ~0 the kernel's need not be;
# a large element carries a proportionally large rounding) and RMS_ATOL_UNITS[dtype] in RMS.
# Measured under the interpreter at the GPU's default tiles (k 3-15, D 8-72, factor 3): the
# largest per-element excess was 9 units in fp16 (fp32 accumulation beats PyTorch's fp16) and 172
# in fp32 (dv at k = 15: long fp32 sums), whose RMS error was up to 4x PyTorch's fp32 one and 22
# units; bf16 as fp16. The bounds still reject a zeroed element of typical size and "mask" for
# "zeros" at k = 7 or 15 in every dtype (tests/test_local_attention.py::test_check_*).
FACTOR = 3.0
ATOL_UNITS = {torch.float32: 512.0, torch.float16: 32.0, torch.bfloat16: 32.0, torch.float64: 512.0}
RMS_ATOL_UNITS = {torch.float32: 32.0, torch.float16: 1.0, torch.bfloat16: 1.0, torch.float64: 32.0}


def assert_close_to_reference(actual: torch.Tensor, expected64: torch.Tensor, expected_lowp: torch.Tensor,
                              dtype: torch.dtype, name: str = "", factor: float = FACTOR,
                              atol_units: float | None = None, rms_atol_units: float | None = None) -> None:
    """`actual` (a kernel's result from `dtype` inputs) against the float64 reference `expected64`,
    allowing `factor` times the error of `expected_lowp`, the same function computed by PyTorch in
    `dtype` (reference_in_dtype) on the same inputs:

        |actual - ref64| <= factor * |lowp - ref64| + atol * (1 + |ref64| / rms(ref64))   per element,
        rms(actual - ref64) <= factor * rms(lowp - ref64) + RMS_ATOL_UNITS[dtype] * u * rms(ref64)

    with u the unit roundoff of `dtype` and atol = atol_units (default ATOL_UNITS[dtype]) * u *
    rms(ref64); rms_atol_units defaults to RMS_ATOL_UNITS[dtype]. No NaN/inf; on failure the
    message names the worst element.
    """
    atol_units = ATOL_UNITS[dtype] if atol_units is None else atol_units
    rms_atol_units = RMS_ATOL_UNITS[dtype] if rms_atol_units is None else rms_atol_units
    assert actual.shape == expected64.shape == expected_lowp.shape, (
        f"{name}: shapes {tuple(actual.shape)}, {tuple(expected64.shape)}, {tuple(expected_lowp.shape)} differ")
    actual, ref, lowp = (t.detach().double().cpu() for t in (actual, expected64, expected_lowp))
    bad = ~torch.isfinite(actual)
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values, first at {torch.nonzero(bad)[:5].tolist()}"
    assert torch.isfinite(lowp).all(), f"{name}: the {dtype} reference itself is not finite (inputs too large?)"
    u = UNIT_ROUNDOFF[dtype]
    scale = ref.pow(2).mean().sqrt().item()
    err, base = (actual - ref).abs(), (lowp - ref).abs()
    excess = err - (factor * base + atol_units * u * (scale + ref.abs()))
    if (excess > 0).any():
        idx = _worst(excess)
        raise AssertionError(
            f"{name}: {int((excess > 0).sum())} of {err.numel()} elements beyond {factor:g} x the {dtype} "
            f"reference's error + {atol_units:g} u (rms + |y|) (u = {u:.2e}, rms {scale:.3g}); worst at {idx}: got "
            f"{actual[idx].item():.6g}, float64 {ref[idx].item():.6g}, {dtype} reference {lowp[idx].item():.6g}")
    _assert_rms_error_within(err, base, u * scale, factor, rms_atol_units, dtype, name)


def _assert_rms_error_within(err, base, unit, factor, rms_atol_units, dtype, name) -> None:
    """rms(err) <= factor * rms(base) + rms_atol_units * unit (unit: u x rms of the reference)."""
    rms_err, rms_base = err.pow(2).mean().sqrt().item(), base.pow(2).mean().sqrt().item()
    limit = factor * rms_base + rms_atol_units * unit
    assert rms_err <= limit, (
        f"{name}: RMS error {rms_err:.3e} > {factor:g} x the {dtype} reference's {rms_base:.3e} "
        f"+ {rms_atol_units:g} u rms = {limit:.3e}; worst element at {_worst(err)}")


def assert_max_error_within(actual: torch.Tensor, expected64: torch.Tensor, expected_lowp: torch.Tensor,
                            dtype: torch.dtype, name: str = "", factor: float = FACTOR,
                            atol_units: float | None = None, rms_atol_units: float | None = None) -> None:
    """flash-attention's tests' bound, looser than assert_close_to_reference's per element: the
    largest error at most `factor` x PyTorch's largest in `dtype` plus atol_units u rms, and the
    RMS error at most `factor` x PyTorch's plus rms_atol_units u rms. Where an element is a sum
    that cancels (a table gradient), both errors have heavy tails and PyTorch's may be small at
    the element where the kernel's is large: an fp16 drel_cols element 0.020 off against PyTorch's
    0.0006 there, PyTorch's largest 0.018 and RMS errors 0.75 % and 0.63 % (bench/fuzz_ops.py)."""
    atol_units = ATOL_UNITS[dtype] if atol_units is None else atol_units
    rms_atol_units = RMS_ATOL_UNITS[dtype] if rms_atol_units is None else rms_atol_units
    actual, ref, lowp = (t.detach().double().cpu() for t in (actual, expected64, expected_lowp))
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    u, scale = UNIT_ROUNDOFF[dtype], ref.pow(2).mean().sqrt().item()
    err, base = (actual - ref).abs(), (lowp - ref).abs()
    limit = factor * base.max().item() + atol_units * u * scale
    assert err.max().item() <= limit, (
        f"{name}: largest error {err.max().item():.3e} > {factor:g} x the {dtype} reference's largest "
        f"{base.max().item():.3e} + {atol_units:g} u rms = {limit:.3e}; worst at {_worst(err)}")
    _assert_rms_error_within(err, base, u * scale, factor, rms_atol_units, dtype, name)


def results_in_dtype(fn, leaves64, dy64: torch.Tensor, dtype: torch.dtype, device="cpu") -> tuple:
    """fn(*leaves) and the gradients of its leaves computed by PyTorch in `dtype` on `device`, from
    float64 leaves and output gradient rounded to it: PyTorch's own error in that dtype on the
    same inputs, the yardstick of assert_close_to_reference (for ops whose reference takes its
    inputs as they are; the local op's is reference_in_dtype)."""
    leaves = [t.detach().to(device, dtype).requires_grad_(True) for t in leaves64]
    out = fn(*leaves)
    return out, torch.autograd.grad(out, leaves, dy64.to(device, dtype))


def assert_close_everywhere(actual: torch.Tensor, expected64: torch.Tensor, expected_lowp: torch.Tensor,
                            dtype: torch.dtype, name: str = "") -> None:
    """assert_close's relative RMS bound and assert_close_to_reference's bound of every element by
    PyTorch's own error in `dtype`: a relative RMS alone passes a few wrong elements (one zeroed
    element of 6480 is 1.2 % RMS, under bf16's 3e-2)."""
    assert_close(actual, expected64, dtype, name)
    assert_close_to_reference(actual, expected64, expected_lowp, dtype, name)


def assert_module_under_autocast_matches_float64(module, shape, dtype: torch.dtype, device, seed: int = 0) -> None:
    """`module` (a layer on `device`, the Triton backend) under `dtype` autocast against itself in
    float64 on the reference backend: y and the gradients of x and of every parameter, each element
    within assert_close_everywhere's bounds of PyTorch's own error under the same autocast (the
    module on the reference backend). x (channels_last, of `shape`) holds values of `dtype`, as
    autocast reads them."""
    import copy

    reference_module = copy.deepcopy(module)
    reference_module.backend = "reference"
    exact_module = copy.deepcopy(reference_module).double()  # (on the device: float64 is fast on a GPU)
    gen = torch.Generator().manual_seed(seed)
    x64 = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype).double()
    x64 = x64.contiguous(memory_format=torch.channels_last).to(device)
    dy = torch.randn(shape[0], module.out_channels, *shape[2:], generator=gen, dtype=torch.float64)

    def run(layer, x, autocast):
        x = x.clone().requires_grad_(True)
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
            out = layer(x)
        return out, torch.autograd.grad(out, [x, *layer.parameters()], dy.to(device, out.dtype))

    out, grads = run(module, x64.float(), True)
    lowp, lowp_grads = run(reference_module, x64.float(), True)
    exact, exact_grads = run(exact_module, x64, False)
    assert out.dtype == lowp.dtype == dtype
    assert_close_everywhere(out, exact, lowp, dtype, "y")
    names = ["x", *(name for name, _ in exact_module.named_parameters())]
    for name, g, e, r in zip(names, grads, exact_grads, lowp_grads):
        assert g.dtype == r.dtype, name
        assert_close_everywhere(g, e, r, dtype, name)


def load_bench_script(name: str):
    """bench/<name>.py as a module (the bench folder is not a package)."""
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def zero_in_exact_arithmetic(expected64: torch.Tensor, scale: float) -> bool:
    """Whether a float64 result is zero next to `scale` (the output's largest value): a gradient
    that vanishes in exact arithmetic (a softmax over one key; logits all shifted alike)."""
    return expected64.detach().abs().max().item() <= 1e-12 * scale


def assert_rounding_noise(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, scale: float,
                          name: str = "", expected_lowp: torch.Tensor | None = None) -> None:
    """A result that is zero in exact arithmetic is rounding noise in every implementation: at
    most 3x PyTorch's largest error in `dtype` (expected_lowp, where given) plus 64 ulps of
    `scale`."""
    error = lambda t: (t.detach().double().cpu() - expected64.detach().cpu()).abs().max().item()
    noise = error(actual)
    theirs = 0.0 if expected_lowp is None else error(expected_lowp)
    assert noise <= 3 * theirs + 64 * torch.finfo(dtype).eps * scale, (
        f"{name}: zero in exact arithmetic, got {noise:.3g} (PyTorch {theirs:.3g})")


def reference_in_dtype(q, k, v, rel_rows=None, rel_cols=None, kernel_size=7, dilation=1, scale=1.0,
                       padding="zeros"):
    """Local attention (SPEC section 1) computed by PyTorch in q's dtype, every intermediate in
    that dtype (the tables cast to it, as autocast would): the yardstick of
    assert_close_to_reference. Differentiable. Materialises the k*k window: small inputs only."""
    dtype = q.dtype
    B, H, W, heads, D = q.shape
    radius = dilation * (kernel_size // 2)
    pad = (0, 0, 0, 0, radius, radius, radius, radius)
    k_pad, v_pad = F.pad(k, pad), F.pad(v, pad)
    taps = [(a * dilation, b * dilation) for a in range(kernel_size) for b in range(kernel_size)]
    keys = torch.stack([k_pad[:, r:r + H, c:c + W] for r, c in taps], dim=-2)  # (B, H, W, heads, k*k, D)
    values = torch.stack([v_pad[:, r:r + H, c:c + W] for r, c in taps], dim=-2)
    logits = torch.einsum("bhwnd,bhwntd->bhwnt", q, keys)
    if rel_rows is not None:
        d_rows = D // 2
        pattern = "bhwnd,td->bhwnt" if rel_rows.dim() == 2 else "bhwnd,ntd->bhwnt"
        rows = torch.einsum(pattern, q[..., :d_rows], rel_rows.to(dtype))  # (B, H, W, heads, k)
        cols = torch.einsum(pattern, q[..., d_rows:], rel_cols.to(dtype))
        logits = logits + rows.repeat_interleave(kernel_size, dim=-1) + cols.repeat(1, 1, 1, 1, kernel_size)
    logits = logits * scale
    if padding == "mask":
        inside = F.pad(torch.ones(H, W, dtype=torch.bool, device=q.device), (radius,) * 4)
        valid = torch.stack([inside[r:r + H, c:c + W] for r, c in taps], dim=-1)  # (H, W, k*k)
        logits = logits.masked_fill(~valid[None, :, :, None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.einsum("bhwnt,bhwntd->bhwnd", probs, values)


# Spills of default configs that some Triton releases make and the others do not (sm_90), as
# (major.minor, kernel, head dim or None): the most bytes allowed. Checked on Triton 3.3.1, 3.4.0,
# 3.5.1, 3.6.0, 3.7.1, 3.8.0 and 3.9.0 (2026-11-30); 3.5, 3.6, 3.7 and 3.9 spill nowhere.
KNOWN_SPILLS = {
    # One warp's two (16, 64) fp32 accumulators and the smallest step (16 strip pixels) need up to
    # 28 bytes more than 255 registers on 3.3 and 3.4 (bf16 k = 7: 28; fp16 k = 3: 4 on 3.3, 8 on
    # 3.4); 2 warps do not spill but execute about 3x the instructions (and 3.5-3.9 do not spill at
    # 1 warp).
    ("3.3", "local_bwd_dkdv", 64): 28,
    ("3.4", "local_bwd_dkdv", 64): 28,
    # 3.4 only: the sliding stem's dk/dv (16 x 16 tiles, 4 warps, bf16) at 168 registers, 44 / 36 bytes.
    ("3.4", "spatial_sliding_bwd_dkdv", 16): 44,
    # 3.8 only: fp32 k = 7 (4 warps, FMA dots) at 72 registers, 4 bytes (an 8-byte stack frame).
    ("3.8", "local_bwd_dkdv", 32): 4,
    # The sliding stem's backward (bf16, the paper's stem): 3.3 8 bytes at 168 registers, 3.8 4
    # bytes at 128 (3.9 takes 168 and spills nothing).
    ("3.3", "attention_stem_sliding_bwd", None): 8,
    ("3.8", "attention_stem_sliding_bwd", None): 4,
}


def known_spill_bytes(kernel: str, head_dim) -> int:
    """The spill bytes allowed for `kernel` at `head_dim` on the running Triton: 0 unless listed."""
    from sasa_triton.inspect import triton_minor_version
    return KNOWN_SPILLS.get((triton_minor_version(), kernel, head_dim), 0)


# Bad options shared by the stem ops (spatial_attention2d, attention_stem2d), checked by the same
# argument checks: (overrides, error type, message) as in each file's BAD_INPUTS.
STEM_OPTION_ERRORS = [
    pytest.param(dict(block_size=2.0), TypeError, "block_size must be an int", id="block_size-float"),
    pytest.param(dict(scale="1"), TypeError, "scale must be a float", id="scale-str"),
    pytest.param(dict(scale=float("inf")), ValueError, "scale must be finite", id="scale-inf"),
    pytest.param(dict(window="global"), ValueError, "window must be one of", id="window"),
    pytest.param(dict(padding="reflect"), ValueError, "padding must be one of", id="padding"),
    pytest.param(dict(backend="cuda"), ValueError, "backend must be one of", id="backend"),
]


def autograd_graph_nodes(grad_fn) -> set:
    """Type names of every node of the autograd graph that ends in grad_fn."""
    names, seen, stack = set(), set(), [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


def penalty_gradients(fn, leaves, seed=0) -> tuple:
    """The gradients a gradient penalty (a GAN's R1 term, any double backward) takes through fn:
    L = sum(fn(*leaves) * w) for a fixed random w, its gradients g = dL/d(leaves) with
    create_graph=True, then P = sum_i sum(g_i * u_i) for fixed random u_i, and dP/d(leaves).
    Returns (first-order gradients, second-order gradients), in the leaves' order. w and u are drawn
    in fp32 and cast (exactly) to each run's dtype, so runs in fp32 and float64 see the same values."""
    gen = torch.Generator().manual_seed(seed)
    draw = lambda like: torch.randn(like.shape, generator=gen).to(like.device, like.dtype)  # noqa: E731
    y = fn(*leaves)
    first = torch.autograd.grad((y * draw(y)).sum(), leaves, create_graph=True)
    penalty = sum((g * draw(g)).sum() for g in first)
    return first, torch.autograd.grad(penalty, leaves)


def assert_penalty_gradients(fn, reference_fn, leaves, names, seed=0) -> None:
    """fn's first- and second-order gradients (penalty_gradients) on fp32 leaves within
    assert_close_to_reference of reference_fn's in float64, against reference_fn's own in fp32."""
    def run(function, dtype):
        copies = [t.detach().to(dtype).requires_grad_(True) for t in leaves]
        return penalty_gradients(function, copies, seed)

    actual, exact, in_dtype = run(fn, torch.float32), run(reference_fn, torch.float64), run(reference_fn, torch.float32)
    for order in range(2):
        for name, got, expected64, expected32 in zip(names, actual[order], exact[order], in_dtype[order]):
            assert_close_to_reference(got, expected64, expected32, torch.float32, f"{'d' * (order + 1)}{name}")


def _forward_ad_tangent(fn, primal, tangent, requires_grad):
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        dual = forward_ad.make_dual(primal.detach().requires_grad_(requires_grad), tangent)
        return forward_ad.unpack_dual(fn(dual)).tangent


# Forward-mode AD and torch.func's transforms, each as what it computes from a one-input fn, its
# input x, a tangent t (x's shape) and a cotangent c (the output's shape). The ops run their
# PyTorch reference under them.
TRANSFORMS = {
    "forward_ad": lambda fn, x, t, c: _forward_ad_tangent(fn, x, t, False),
    "forward_ad_requires_grad": lambda fn, x, t, c: _forward_ad_tangent(fn, x, t, True),
    "func.jvp": lambda fn, x, t, c: torch.func.jvp(fn, (x,), (t,))[1],
    "func.vjp": lambda fn, x, t, c: torch.func.vjp(fn, x)[1](c)[0],
    "func.grad": lambda fn, x, t, c: torch.func.grad(lambda y: (fn(y) * c).sum())(x),
    "func.vmap": lambda fn, x, t, c: torch.func.vmap(fn)(torch.stack([x, t])),
}


def assert_transforms_match_reference(transform, fn, x, tangent, cotangent) -> None:
    """TRANSFORMS[transform] of fn("triton", dtype) at fp32 x within assert_close_to_reference of
    fn("reference", float64)'s, against fn("reference", fp32)'s own; fn(backend, dtype) gives the
    one-input function, its other inputs in dtype."""
    compute = TRANSFORMS[transform]
    got = compute(fn("triton", torch.float32), x, tangent, cotangent)
    assert got is not None, "no tangent"
    expected = compute(fn("reference", torch.float64), x.double(), tangent.double(), cotangent.double())
    in_dtype = compute(fn("reference", torch.float32), x, tangent, cotangent)
    assert_close_to_reference(got, expected, in_dtype, torch.float32, transform)
