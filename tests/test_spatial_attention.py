"""spatial_attention2d (the stem's op): the reference against the definition, and the Triton
kernels against the float64 reference, forward and backward.

Without CUDA the kernels run through Triton's interpreter (tests/conftest.py); with CUDA, compiled.
"""
import pytest
import torch

import sasa_triton
from sasa_triton.ops.spatial_attention import _bwd, _fwd
from sasa_triton.reference import spatial_attention2d as reference

from helpers import STEM_OPTION_ERRORS, assert_close, assert_close_everywhere, results_in_dtype


def direct_definition(q, k, values, mix, block_size, scale, window, padding):
    """y_ij = sum_ab softmax_ab(scale * q_ij . k_ab) * sum_m mix[a, b, m] * values[ab, m], as loops."""
    B, H, W, heads, D = q.shape
    M = values.shape[3]
    out = torch.zeros(B, H, W, heads, D, dtype=torch.float64)
    for n in range(B):
        for i in range(H):
            for j in range(W):
                for h in range(heads):
                    logits, mixed = [], []
                    for a in range(block_size):
                        for b in range(block_size):
                            if window == "block":
                                row, col = (i // block_size) * block_size + a, (j // block_size) * block_size + b
                            else:
                                row, col = i - block_size // 2 + a, j - block_size // 2 + b
                            inside = 0 <= row < H and 0 <= col < W
                            if not inside and padding == "mask":
                                continue
                            key = k[n, row, col, h] if inside else torch.zeros(D, dtype=torch.float64)
                            value = torch.zeros(D, dtype=torch.float64)
                            if inside:
                                for m in range(M):
                                    value = value + mix[a, b, m] * values[n, row, col, m, h]
                            logits.append(scale * torch.dot(q[n, i, j, h], key))
                            mixed.append(value)
                    weights = torch.softmax(torch.stack(logits), dim=0)
                    out[n, i, j, h] = sum(w * v for w, v in zip(weights, mixed))
    return out


def make_inputs(B, H, W, heads, D, M, block_size, device, dtype, mix_dtype=None, seed=0):
    """Kernel inputs rounded to `dtype` (mix to mix_dtype) and the same values in float64."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64) for _ in range(2))
    values = torch.randn(B, H, W, M, heads, D, generator=gen, dtype=torch.float64)
    mix = torch.softmax(torch.randn(block_size, block_size, M, generator=gen, dtype=torch.float64) * 2, dim=-1)
    q, k, values = (t.to(dtype) for t in (q, k, values))
    mix = mix.to(mix_dtype or dtype)
    kernel_inputs = [t.to(device) for t in (q, k, values, mix)]
    reference_inputs = [t.double() for t in (q, k, values, mix)]
    return kernel_inputs, reference_inputs


# --------------------------------------------------------------------------------------------
# The reference
# --------------------------------------------------------------------------------------------

REFERENCE_CASES = [
    # H, W, block_size, window, padding
    pytest.param(4, 6, 2, "block", "zeros", id="H4-W6-bs2-block-divisible"),
    pytest.param(5, 7, 3, "block", "zeros", id="H5-W7-bs3-block-zeros"),
    pytest.param(5, 7, 3, "block", "mask", id="H5-W7-bs3-block-mask"),
    pytest.param(5, 6, 3, "sliding", "zeros", id="H5-W6-bs3-sliding-zeros"),
    pytest.param(5, 6, 3, "sliding", "mask", id="H5-W6-bs3-sliding-mask"),
    pytest.param(4, 5, 4, "sliding", "zeros", id="H4-W5-bs4-sliding-even-zeros"),
    pytest.param(3, 5, 2, "sliding", "mask", id="H3-W5-bs2-sliding-even-mask"),
]


@pytest.mark.parametrize("H,W,block_size,window,padding", REFERENCE_CASES)
def test_reference_matches_definition(H, W, block_size, window, padding):
    (q, k, values, mix), _ = make_inputs(2, H, W, 2, 3, 2, block_size, "cpu", torch.float64)
    out = reference(q, k, values, mix, block_size=block_size, scale=0.7, window=window, padding=padding)
    expected = direct_definition(q, k, values, mix, block_size, 0.7, window, padding)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_reference_block_attends_within_its_block_only():
    """Changing a key/value in one block leaves every other block's output unchanged."""
    (q, k, values, mix), _ = make_inputs(1, 8, 8, 1, 4, 2, 4, "cpu", torch.float64)
    out = reference(q, k, values, mix, block_size=4)
    k2, values2 = k.clone(), values.clone()
    k2[0, 1, 2] += 1.0
    values2[0, 1, 2] += 1.0
    out2 = reference(q, k2, values2, mix, block_size=4)
    changed = (out2 - out).abs().amax(dim=(-1, -2))[0] > 0
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:4, :4] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("window,padding", [("block", "zeros"), ("sliding", "mask")])
def test_reference_gradcheck(window, padding):
    (q, k, values, mix), _ = make_inputs(1, 3, 3, 1, 2, 2, 2, "cpu", torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (q, k, values, mix)]
    assert torch.autograd.gradcheck(
        lambda *t: reference(*t, block_size=2, scale=0.9, window=window, padding=padding), inputs, fast_mode=True)


# --------------------------------------------------------------------------------------------
# The Triton kernels against the float64 reference
# --------------------------------------------------------------------------------------------

KERNEL_CASES = [
    # B, H, W, heads, D, M, block_size, window, padding
    pytest.param(1, 6, 5, 2, 5, 3, 4, "block", "zeros", id="B1-H6-W5-h2-D5-M3-bs4-block-zeros"),
    pytest.param(2, 5, 7, 1, 16, 2, 4, "block", "mask", id="B2-H5-W7-h1-D16-M2-bs4-block-mask"),
    pytest.param(1, 5, 7, 2, 3, 2, 3, "block", "zeros", id="B1-H5-W7-h2-D3-M2-bs3-block-zeros"),
    pytest.param(1, 5, 6, 1, 8, 4, 2, "block", "mask", id="B1-H5-W6-h1-D8-M4-bs2-block-mask-group4"),
    pytest.param(1, 5, 5, 1, 6, 2, 3, "sliding", "zeros", id="B1-H5-W5-h1-D6-M2-bs3-sliding-zeros"),
    pytest.param(1, 4, 5, 1, 4, 2, 4, "sliding", "mask", id="B1-H4-W5-h1-D4-M2-bs4-sliding-even-mask"),
]


def run_both(case, device, dtype, mix_dtype=None, scale=0.7):
    """The Triton op on `dtype` inputs (mix in mix_dtype), the float64 reference, and the same
    reference computed by PyTorch in `dtype` on the op's device (lowp: its y and gradients): y
    and the gradients of q, k, values and mix of each."""
    B, H, W, heads, D, M, block_size, window, padding = case
    kernel_inputs, reference_inputs = make_inputs(B, H, W, heads, D, M, block_size, device, dtype, mix_dtype)
    for t in kernel_inputs:
        t.requires_grad_(True)
    kwargs = dict(block_size=block_size, scale=scale, window=window, padding=padding)
    out = sasa_triton.spatial_attention2d(*kernel_inputs, backend="triton", **kwargs)
    expected, dy, expected_grads, lowp = references(reference_inputs, kwargs, dtype, device)
    grads = torch.autograd.grad(out, kernel_inputs, dy.to(device, dtype))
    return out, expected, grads, expected_grads, lowp


def references(reference_inputs, kwargs, dtype, device="cpu"):
    """The float64 reference's y, the output gradient dy (seeded), the reference's gradients, and
    the same computed by PyTorch in `dtype` on `device` (lowp: its y and gradients)."""
    for t in reference_inputs:
        t.requires_grad_(True)
    expected = reference(*reference_inputs, **kwargs)
    dy = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected_grads = torch.autograd.grad(expected, reference_inputs, dy)
    lowp = results_in_dtype(lambda *leaves: reference(*leaves, **kwargs), reference_inputs, dy, dtype, device)
    return expected, dy, expected_grads, lowp


GRAD_NAMES = ["dq", "dk", "dvalues", "dmix"]


def check_all(out, expected, grads, expected_grads, lowp, dtype, mix_dtype=None):
    """y and every gradient: within the dtype's relative RMS of float64 and, per element, within
    the suite's bound of PyTorch's own error in the dtype (tests/helpers.py)."""
    assert out.dtype == dtype and out.shape == expected.shape
    assert_close_everywhere(out, expected, lowp[0], dtype, "y")
    for name, g, e, r in zip(GRAD_NAMES, grads, expected_grads, lowp[1]):
        assert g.dtype == (mix_dtype or dtype if name == "dmix" else dtype), name
        assert_close_everywhere(g, e, r, dtype, name)


@pytest.mark.parametrize("B,H,W,heads,D,M,block_size,window,padding", KERNEL_CASES)
def test_forward_backward_fp32(B, H, W, heads, D, M, block_size, window, padding, device):
    case = (B, H, W, heads, D, M, block_size, window, padding)
    check_all(*run_both(case, device, torch.float32), torch.float32)


@pytest.mark.parametrize("mix_dtype", [torch.float16, torch.float32], ids=["mix-fp16", "mix-fp32"])
@pytest.mark.parametrize("B,H,W,heads,D,M,block_size,window,padding", [KERNEL_CASES[0], KERNEL_CASES[4]])
def test_forward_backward_fp16(B, H, W, heads, D, M, block_size, window, padding, mix_dtype, device):
    """fp16 activations; the mixture table fp16 too, or fp32 as a parameter-derived table under autocast."""
    case = (B, H, W, heads, D, M, block_size, window, padding)
    check_all(*run_both(case, device, torch.float16, mix_dtype), torch.float16, mix_dtype)


TILINGS = [
    # block_size, window, H, W, config of fwd and dq, config of dk/dv
    pytest.param(3, "block", 4, 7, dict(GROUP=2, BLOCK_M=16, BLOCK_N=32), dict(GROUP=2, BLOCK_M=16, BLOCK_N=16),
                 id="bs3-block-group2-chunked-M16-N32"),
    pytest.param(5, "block", 6, 7, dict(GROUP=1, BLOCK_M=16, BLOCK_N=16), dict(GROUP=1, BLOCK_M=32, BLOCK_N=16),
                 id="bs5-block-25px-chunks16"),
    pytest.param(3, "sliding", 4, 9, dict(BLOCK_H=2, BLOCK_W=8), dict(BLOCK_H=1, BLOCK_W=16),
                 id="bs3-sliding-2x8-1x16"),
]


@pytest.mark.parametrize("padding", ["zeros", "mask"])
@pytest.mark.parametrize("block_size,window,H,W,config,config_dkdv", TILINGS)
def test_tilings_write_every_element(block_size, window, H, W, config, config_dkdv, padding, device):
    """Other tilings (blocks cut in chunks, several blocks per tile, several tiles per dk/dv
    program) through the launchers, with NaN-poisoned output and gradient buffers: every element
    is written and matches the reference."""
    B, heads, D, M, scale = 1, 2, 4, 2, 0.8
    kernel_inputs, reference_inputs = make_inputs(B, H, W, heads, D, M, block_size, device, torch.float32)
    q, k, values, mix = kernel_inputs
    common = dict(num_warps=4, num_stages=1)
    y = torch.full_like(q, float("nan"))
    lse = torch.full((B, heads, H, W), float("nan"), device=device)
    y, lse = _fwd(q, k, values, mix, block_size, scale, window, padding, y=y, lse=lse, config={**config, **common})
    assert torch.isfinite(lse).all()
    ref_inputs = [t.requires_grad_(True) for t in reference_inputs]
    expected = reference(*ref_inputs, block_size=block_size, scale=scale, window=window, padding=padding)
    assert_close(y, expected, torch.float32, "y")

    dy = torch.randn(expected.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, values))
    got = _bwd(q, k, values, mix, y, lse, dy.to(device, torch.float32), block_size, scale, window, padding,
               grads=grads, config_dq={**config, **common},
               config_dkdv={**config_dkdv, "TILES_PER_PROGRAM": 3, **common})
    expected_grads = torch.autograd.grad(expected, ref_inputs, dy)
    for name, g, e in zip(["dq", "dk", "dvalues", "dmix"], got, expected_grads):
        assert_close(g, e, torch.float32, name)


DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16"}


@pytest.mark.parametrize("block_size,window,padding,D,H,W,dtype", [
    # The paper's stem; D > 64 (32-pixel chunks); 81-tap blocks in chunks: the block kernels' 16-bit
    # forward fills 64-pixel chunks, fp32's 16, so both. The sliding kernels' tiles are the same in
    # both dtypes: one each (bs 5: 16-wide tiles).
    *(pytest.param(*case, dtype, id=f"{name}-{DTYPE_IDS[dtype]}") for dtype in DTYPE_IDS for case, name in (
        ((4, "block", "zeros", 16, 9, 10), "bs4-block-zeros-D16"),
        ((3, "block", "mask", 72, 7, 5), "bs3-block-mask-D72"),
        ((9, "block", "zeros", 8, 10, 11), "bs9-block-zeros-D8"))),
    pytest.param(4, "sliding", "mask", 16, 9, 10, torch.float16, id="bs4-sliding-mask-D16-fp16"),
    pytest.param(5, "sliding", "zeros", 8, 6, 17, torch.float32, id="bs5-sliding-zeros-D8-fp32"),
])
def test_gpu_default_configs(block_size, window, padding, D, H, W, dtype, device):
    """The GPU's default tiles (tuning.gpu_default_config; the interpreter otherwise runs smaller
    ones) through the launchers, with NaN-poisoned buffers: every element written, y and every
    gradient within the suite's bounds of PyTorch's own error in the dtype, per element."""
    from sasa_triton import tuning

    case = (1, H, W, 2, D, 3, block_size, window, padding)
    configs = {kind: tuning.gpu_default_config(f"spatial_{window}_{kind}", block_size, 1, D, dtype)
               for kind in ("fwd", "dq", "dkdv")}
    if device.type == "cpu":  # (what the interpreter would run otherwise)
        assert configs["fwd"] != tuning.default_config(f"spatial_{window}_fwd", block_size, 1, D, dtype)
    kernel_inputs, reference_inputs = make_inputs(*case[:7], device, dtype)
    q, k, values, mix = kernel_inputs
    kwargs = dict(block_size=block_size, scale=0.7, window=window, padding=padding)
    y = torch.full_like(q, float("nan"))
    lse = torch.full((1, 2, H, W), float("nan"), device=device)
    y, lse = _fwd(q, k, values, mix, block_size, 0.7, window, padding, y=y, lse=lse, config=configs["fwd"])
    assert torch.isfinite(lse).all()
    expected, dy, expected_grads, lowp = references(reference_inputs, kwargs, dtype, device)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, values))
    got = _bwd(q, k, values, mix, y, lse, dy.to(device, dtype), block_size, 0.7, window, padding, grads=grads,
               config_dq=configs["dq"], config_dkdv=configs["dkdv"])
    check_all(y, expected, got, expected_grads, lowp, dtype)


@pytest.mark.parametrize("window", ["block", "sliding"])
def test_strided_views_of_a_fused_projection(window, device):
    """q, k and the M value maps as views of one (2 + M) * C-channel projection, NCHW and
    channels_last, need no copy and give the reference's result."""
    B, H, W, heads, D, M, bs = 1, 4, 5, 1, 4, 2, 2
    gen = torch.Generator().manual_seed(3)
    mix = torch.softmax(torch.randn(bs, bs, M, generator=gen), -1).to(device)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        proj = torch.randn(B, (2 + M) * heads * D, H, W, generator=gen).to(device)
        proj = proj.contiguous(memory_format=memory_format).permute(0, 2, 3, 1).unflatten(-1, (2 + M, heads, D))
        q, k, values = proj[:, :, :, 0], proj[:, :, :, 1], proj[:, :, :, 2:]
        out = sasa_triton.spatial_attention2d(q, k, values, mix, block_size=bs, window=window, backend="triton")
        expected = reference(q.double(), k.double(), values.double(), mix.double(), block_size=bs, window=window)
        assert_close(out, expected, torch.float32, str(memory_format))


@pytest.mark.parametrize("window", ["block", "sliding"])
def test_saved_tensors_hold_nothing_of_block_size(window, device):
    """What autograd keeps for backward: q, k, values, mix, y and one log-sum-exp per (pixel, head);
    nothing with block_size**2 entries per pixel, no mixed value tensor."""
    B, H, W, heads, D, M, bs = 1, 4, 4, 2, 4, 3, 4
    kernel_inputs, _ = make_inputs(B, H, W, heads, D, M, bs, device, torch.float32)
    for t in kernel_inputs:
        t.requires_grad_(True)
    q, k, values, mix = kernel_inputs
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sasa_triton.spatial_attention2d(q, k, values, mix, block_size=bs, window=window, backend="triton")
    allowed = {tuple(q.shape), tuple(values.shape), tuple(mix.shape), (B, heads, H, W)}
    shapes = [tuple(t.shape) for t in saved]
    assert all(s in allowed for s in shapes), shapes
    assert sum(t.numel() for t in saved) == 3 * q.numel() + values.numel() + mix.numel() + B * heads * H * W
    out.sum().backward()


@pytest.mark.parametrize("window,padding", [("block", "zeros"), ("sliding", "mask")])
def test_double_backward_goes_through_the_reference(window, padding, device):
    """create_graph=True (a gradient penalty): first- and second-order gradients of q, k, values
    and mix against float64 (they were zero in the second order, with only a PyTorch warning)."""
    from helpers import assert_penalty_gradients

    gen = torch.Generator().manual_seed(3)
    B, H, W, heads, D, M, block_size = 1, 5, 4, 2, 4, 2, 2
    leaves = [torch.randn(B, H, W, heads, D, generator=gen), torch.randn(B, H, W, heads, D, generator=gen),
              torch.randn(B, H, W, M, heads, D, generator=gen),
              torch.softmax(torch.randn(block_size, block_size, M, generator=gen), -1)]
    op = lambda backend: lambda q, k, values, mix: sasa_triton.spatial_attention2d(  # noqa: E731
        q, k, values, mix, block_size, 0.9, window, padding, backend=backend)
    assert_penalty_gradients(op("triton"), op("reference"), [t.to(device) for t in leaves],
                             ["q", "k", "values", "mix"])


@pytest.mark.parametrize("transform", ["forward_ad", "func.vjp", "func.vmap"])
def test_forward_ad_and_torch_func_transforms(transform, device):
    """Forward-mode AD and torch.func's transforms (the tangent was dropped, None, with no error):
    the reference runs under them, against float64."""
    from helpers import assert_transforms_match_reference

    gen = torch.Generator().manual_seed(4)
    q, k, t, c = (torch.randn(1, 4, 5, 2, 4, generator=gen).to(device) for _ in range(4))
    values = torch.randn(1, 4, 5, 2, 2, 4, generator=gen).to(device)
    mix = torch.softmax(torch.randn(2, 2, 2, generator=gen), -1).to(device)
    fn = lambda backend, dtype: lambda x: sasa_triton.spatial_attention2d(  # noqa: E731
        x, k.to(dtype), values.to(dtype), mix.to(dtype), 2, 0.9, "sliding", "mask", backend=backend)
    assert_transforms_match_reference(transform, fn, q, t, c)


def test_fp16_large_logits_do_not_overflow(device):
    """Logits near 1e4 in fp16 inputs stay finite: the softmax runs in fp32."""
    B, H, W, heads, D, M, bs = 1, 4, 4, 1, 16, 2, 4
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(B, H, W, heads, D, generator=gen) * 25).half()
    k = (torch.randn(B, H, W, heads, D, generator=gen) * 25).half()
    values = torch.randn(B, H, W, M, heads, D, generator=gen).half()
    mix = torch.softmax(torch.randn(bs, bs, M, generator=gen), -1).half()
    assert (q.float() * k.float()).sum(-1).abs().max() > 1e3
    out = sasa_triton.spatial_attention2d(*(t.to(device) for t in (q, k, values, mix)), block_size=bs,
                                          backend="triton")
    assert torch.isfinite(out).all()
    expected = reference(q.double(), k.double(), values.double(), mix.double(), block_size=bs)
    assert_close(out, expected, torch.float16, "y")


def test_empty_batch(device):
    q = torch.randn(0, 4, 4, 2, 8, device=device, requires_grad=True)
    values = torch.randn(0, 4, 4, 3, 2, 8, device=device, requires_grad=True)
    mix = torch.softmax(torch.randn(4, 4, 3, device=device), -1).requires_grad_(True)
    out = sasa_triton.spatial_attention2d(q, q, values, mix, block_size=4, backend="triton")
    assert out.shape == q.shape
    out.sum().backward()
    assert mix.grad is not None and torch.all(mix.grad == 0)


def test_backend_selection_on_cpu(monkeypatch, device):
    q = torch.randn(1, 4, 4, 1, 4, dtype=torch.float64)
    values = torch.randn(1, 4, 4, 2, 1, 4, dtype=torch.float64)
    mix = torch.full((2, 2, 2), 0.5, dtype=torch.float64)
    out = sasa_triton.spatial_attention2d(q, q, values, mix, block_size=2, backend="reference")
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):  # the kernels do not take float64 (where they run)
        sasa_triton.spatial_attention2d(q.to(device), q.to(device), values.to(device), mix.to(device),
                                        block_size=2, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    # auto on CPU without the interpreter: the reference.
    out = sasa_triton.spatial_attention2d(q.float(), q.float(), values.float(), mix.float(), block_size=2)
    torch.testing.assert_close(out.double(), reference(q, q, values, mix, block_size=2), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="backend='triton'"):
        sasa_triton.spatial_attention2d(q.float(), q.float(), values.float(), mix.float(), block_size=2,
                                        backend="triton")


def _args(**overrides):
    q = torch.randn(1, 4, 4, 2, 4)
    args = dict(q=q, k=q.clone(), values=torch.randn(1, 4, 4, 3, 2, 4), mix=torch.full((2, 2, 3), 1 / 3),
                block_size=2, scale=1.0, window="block", padding="zeros", backend="reference")
    args.update(overrides)
    return args


BAD_INPUTS = [
    pytest.param(dict(q=torch.randn(1, 4, 4, 8)), ValueError, "q must have rank 5", id="q-rank"),
    pytest.param(dict(q=[1.0]), TypeError, "q must be a torch.Tensor", id="q-not-tensor"),
    pytest.param(dict(k=torch.randn(1, 4, 4, 2, 5)), ValueError, "k must have the shape of q", id="k-shape"),
    pytest.param(dict(values=torch.randn(1, 4, 4, 2, 4)), ValueError, "values must have rank 6", id="values-rank"),
    pytest.param(dict(values=torch.randn(1, 4, 4, 3, 1, 4)), ValueError, "values must have shape",
                 id="values-heads"),
    pytest.param(dict(values=torch.randn(1, 4, 4, 3, 2, 4, dtype=torch.float64)), TypeError, "share a dtype",
                 id="values-dtype"),
    pytest.param(dict(mix=torch.full((2, 2, 2), 0.5)), ValueError, "mix must have shape", id="mix-M"),
    pytest.param(dict(mix=torch.full((3, 3, 3), 0.5)), ValueError, "mix must have shape", id="mix-block"),
    pytest.param(dict(mix=torch.full((2, 2), 0.5)), ValueError, "mix must have rank 3", id="mix-rank"),
    pytest.param(dict(mix=torch.ones(2, 2, 3, dtype=torch.int64)), TypeError, "mix must be a floating", id="mix-int"),
    pytest.param(dict(block_size=0), ValueError, "block_size must be >= 1", id="block_size-0"),
    *STEM_OPTION_ERRORS,
]


@pytest.mark.parametrize("overrides,error,message", BAD_INPUTS)
def test_bad_input_raises_clear_errors(overrides, error, message):
    with pytest.raises(error, match=message):
        sasa_triton.spatial_attention2d(**_args(**overrides))


def test_head_dim_above_128_is_refused_by_the_kernels(device):
    q = torch.randn(1, 2, 2, 1, 130, device=device)
    values = torch.randn(1, 2, 2, 1, 1, 130, device=device)
    with pytest.raises(ValueError, match="D <= 128"):
        sasa_triton.spatial_attention2d(q, q, values, torch.ones(2, 2, 1, device=device), block_size=2,
                                        backend="triton")


def test_check_rejects_one_zeroed_element_that_the_relative_rms_passes():
    """check_all's per-element bound has teeth where bf16's relative RMS alone has none: PyTorch's
    own bf16 result passes it, and the same with one dvalues element of typical size zeroed (as a
    kernel skipping a store would leave; 2.3 % RMS, under bf16's 3e-2) fails it."""
    dtype = torch.bfloat16
    case = (1, 8, 9, 2, 8, 3, 3, "sliding", "mask")
    _, reference_inputs = make_inputs(*case[:7], "cpu", dtype)
    kwargs = dict(block_size=3, scale=0.7, window="sliding", padding="mask")
    expected, _, expected_grads, lowp = references(reference_inputs, kwargs, dtype)
    check_all(lowp[0], expected, lowp[1], expected_grads, lowp, dtype)
    exact = expected_grads[2]
    rms = exact.pow(2).mean().sqrt()
    typical = torch.nonzero(((exact.abs() >= rms) & (exact.abs() <= 1.5 * rms)).flatten()).flatten()
    wrong = lowp[1][2].clone().flatten()
    wrong[typical[7]] = 0
    wrong = wrong.view_as(exact)
    assert_close(wrong, exact, dtype, "dvalues")  # the relative RMS alone lets it through
    grads = (*lowp[1][:2], wrong, lowp[1][3])
    with pytest.raises(AssertionError, match="dvalues: 1 of 3456 elements beyond"):
        check_all(lowp[0], expected, grads, expected_grads, lowp, dtype)


# --------------------------------------------------------------------------------------------
# GPU only: larger shapes, bf16, default tiles
# --------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("block_size,window,padding,D", [
    pytest.param(4, "block", "zeros", 16, id="bs4-block-zeros-D16"),
    pytest.param(4, "block", "mask", 64, id="bs4-block-mask-D64"),
    pytest.param(2, "block", "zeros", 24, id="bs2-block-zeros-D24"),
    pytest.param(7, "block", "mask", 32, id="bs7-block-mask-D32"),
    pytest.param(9, "block", "zeros", 16, id="bs9-block-zeros-D16-chunked"),
    pytest.param(4, "sliding", "zeros", 16, id="bs4-sliding-zeros-D16"),
    pytest.param(5, "sliding", "mask", 128, id="bs5-sliding-mask-D128"),
])
def test_gpu_larger_shapes(dtype, block_size, window, padding, D):
    case = (2, 30, 27, 4, D, 4, block_size, window, padding)
    check_all(*run_both(case, "cuda", dtype, torch.float32, scale=D ** -0.5), dtype, torch.float32)


@pytest.mark.gpu
def test_gpu_stem_resolution_is_deterministic():
    """The stem's shape (224 x 224, 4 heads of 16, 4 mixtures): two backward passes agree bit for bit."""
    kernel_inputs, _ = make_inputs(2, 224, 224, 4, 16, 4, 4, "cuda", torch.bfloat16, mix_dtype=torch.float32)
    for t in kernel_inputs:
        t.requires_grad_(True)
    dy = torch.randn(2, 224, 224, 4, 16, device="cuda", dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        out = sasa_triton.spatial_attention2d(*kernel_inputs, block_size=4)
        runs.append(torch.autograd.grad(out, kernel_inputs, dy))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pins the interpreter's bf16 handling")
@pytest.mark.parametrize("window", ["block", "sliding"])
def test_bf16_under_the_interpreter_matches_the_reference(window):
    """The interpreter mishandles bf16 (garbage values); spatial_attention2d computes in fp32 there
    and returns bf16, with bf16 gradients: it agrees with the float64 reference at bf16 tolerance."""
    case = (1, 5, 6, 2, 4, 2, 2, window, "mask")
    check_all(*run_both(case, "cpu", torch.bfloat16), torch.bfloat16)
