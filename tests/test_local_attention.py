"""The Triton kernels of local_attention2d against the float64 reference, forward and backward.

Without CUDA they run through Triton's interpreter (tests/conftest.py); with CUDA, compiled.
"""
import pytest
import torch

import sasa_triton
from sasa_triton.ops.local_attention import _bwd, _fwd
from sasa_triton.reference import local_attention2d as reference

from helpers import assert_close

CASES = [
    # B, H, W, heads, D, k, dilation, padding, rel
    pytest.param(1, 5, 7, 2, 12, 3, 1, "zeros", "shared", id="B1-H5-W7-h2-D12-k3-d1-zeros-shared"),
    pytest.param(2, 6, 5, 1, 16, 3, 2, "mask", "per_head", id="B2-H6-W5-h1-D16-k3-d2-mask-perhead"),
    pytest.param(1, 7, 6, 2, 8, 5, 1, "mask", "shared", id="B1-H7-W6-h2-D8-k5-d1-mask-shared"),
    pytest.param(1, 9, 5, 1, 6, 5, 2, "zeros", "per_head", id="B1-H9-W5-h1-D6-k5-d2-zeros-perhead"),
    pytest.param(1, 4, 9, 3, 10, 7, 1, "zeros", "shared", id="B1-H4-W9-h3-D10-k7-d1-zeros-shared-H<k"),
    pytest.param(1, 3, 3, 1, 20, 7, 1, "mask", "per_head", id="B1-H3-W3-h1-D20-k7-d1-mask-perhead-HW<k"),
    pytest.param(1, 6, 6, 2, 16, 7, 2, "mask", "shared", id="B1-H6-W6-h2-D16-k7-d2-mask-shared"),
    pytest.param(1, 5, 6, 2, 9, 5, 1, "zeros", None, id="B1-H5-W6-h2-D9-k5-d1-zeros-norel"),
    pytest.param(2, 5, 5, 1, 4, 3, 1, "mask", None, id="B2-H5-W5-h1-D4-k3-d1-mask-norel"),
]


def make_inputs(B, H, W, heads, D, k, rel, device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, key, v = (torch.randn(B, H, W, heads, D, generator=gen, dtype=torch.float64) for _ in range(3))
    if rel is None:
        rel_rows = rel_cols = None
    else:
        lead = (heads,) if rel == "per_head" else ()
        rel_rows = torch.randn(*lead, k, D // 2, generator=gen, dtype=torch.float64) * 0.5
        rel_cols = torch.randn(*lead, k, D - D // 2, generator=gen, dtype=torch.float64) * 0.5
    # The kernel sees the inputs rounded to its dtype (the tables stay fp32, as parameters do
    # under autocast); the reference gets the same rounded values in float64.
    q, key, v = (t.to(dtype) for t in (q, key, v))
    if rel is not None:
        rel_rows, rel_cols = rel_rows.float(), rel_cols.float()
    kernel_inputs = [t if t is None else t.to(device) for t in (q, key, v, rel_rows, rel_cols)]
    reference_inputs = [t if t is None else t.double() for t in (q, key, v, rel_rows, rel_cols)]
    return kernel_inputs, reference_inputs


def run_both(case, device, dtype, scale=0.5):
    B, H, W, heads, D, k, dilation, padding, rel = case
    kernel_inputs, reference_inputs = make_inputs(B, H, W, heads, D, k, rel, device, dtype)
    for t in kernel_inputs + reference_inputs:
        if t is not None:
            t.requires_grad_(True)
    kwargs = dict(kernel_size=k, dilation=dilation, scale=scale, padding=padding)
    out = sasa_triton.local_attention2d(*kernel_inputs, backend="triton", **kwargs)
    expected = reference(*reference_inputs, **kwargs)
    dy = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for t in kernel_inputs if t is not None], dy.to(device, dtype))
    expected_grads = torch.autograd.grad(expected, [t for t in reference_inputs if t is not None], dy)
    return out, expected, grads, expected_grads


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel", CASES)
def test_forward_backward_fp32(B, H, W, heads, D, k, dilation, padding, rel, device):
    case = (B, H, W, heads, D, k, dilation, padding, rel)
    out, expected, grads, expected_grads = run_both(case, device, torch.float32)
    assert out.dtype == torch.float32
    assert_close(out, expected, torch.float32, "y")
    for name, g, e in zip(["dq", "dk", "dv", "drel_rows", "drel_cols"], grads, expected_grads):
        assert g.dtype == torch.float32
        assert_close(g, e, torch.float32, name)


LOW_PRECISION_CASES = [CASES[0], CASES[2], CASES[7]]


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel", LOW_PRECISION_CASES)
def test_forward_backward_fp16(B, H, W, heads, D, k, dilation, padding, rel, device):
    case = (B, H, W, heads, D, k, dilation, padding, rel)
    out, expected, grads, expected_grads = run_both(case, device, torch.float16)
    assert out.dtype == torch.float16
    assert_close(out, expected, torch.float16, "y")
    for name, g, e in zip(["dq", "dk", "dv", "drel_rows", "drel_cols"], grads, expected_grads):
        assert_close(g, e, torch.float16, name)


@pytest.mark.parametrize("padding", ["zeros", "mask"])
def test_every_output_element_is_written(padding, device):
    """Poisoned (NaN) output and gradient buffers come back fully finite."""
    B, H, W, heads, D, k = 1, 5, 7, 2, 12, 5
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    y = torch.full_like(q, float("nan"))
    lse = torch.full((B, heads, H, W), float("nan"), device=device)
    y, lse = _fwd(q, key, v, rel_rows, rel_cols, k, 1, 1.0, padding, y=y, lse=lse)
    assert torch.isfinite(y).all() and torch.isfinite(lse).all()
    dy = torch.randn_like(q)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))
    dq, dk, dv, drr, drc = _bwd(q, key, v, rel_rows, rel_cols, y, lse, dy, k, 1, 1.0, padding, grads=grads)
    for g in (dq, dk, dv, drr, drc):
        assert torch.isfinite(g).all()


def test_noncontiguous_and_channels_last_views(device):
    """q, k, v as strided views of one fused projection (NCHW and channels_last) need no copy."""
    B, C_in, H, W, heads, D, k = 1, 4, 5, 6, 2, 8, 3
    gen = torch.Generator().manual_seed(3)
    for memory_format in (torch.contiguous_format, torch.channels_last):
        qkv = torch.randn(B, 3 * heads * D, H, W, generator=gen).to(device).contiguous(memory_format=memory_format)
        q, key, v = qkv.permute(0, 2, 3, 1).unflatten(-1, (3, heads, D)).unbind(3)
        rel_rows = torch.randn(k, D // 2, generator=gen).to(device)
        rel_cols = torch.randn(k, D - D // 2, generator=gen).to(device)
        out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, backend="triton")
        expected = reference(*(t.double() for t in (q, key, v, rel_rows, rel_cols)), kernel_size=k)
        assert_close(out, expected, torch.float32, str(memory_format))


def test_saved_tensors_hold_nothing_of_window_size(device):
    """What autograd keeps for backward: q, k, v, y, the log-sum-exp and the embeddings."""
    B, H, W, heads, D, k = 1, 6, 5, 2, 8, 5
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    for t in (q, key, v, rel_rows, rel_cols):
        t.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, backend="triton")
    allowed = {tuple(q.shape), (B, heads, H, W), tuple(rel_rows.shape), tuple(rel_cols.shape)}
    shapes = [tuple(t.shape) for t in saved]
    assert all(s in allowed for s in shapes), shapes
    assert sum(t.numel() for t in saved) <= 4 * q.numel() + B * heads * H * W + rel_rows.numel() + rel_cols.numel()
    out.sum().backward()


def test_fp16_large_logits_do_not_overflow(device):
    """Logits near 1e4 in fp16 inputs stay finite: the softmax runs in fp32."""
    B, H, W, heads, D, k = 1, 4, 4, 1, 16, 3
    gen = torch.Generator().manual_seed(5)
    q = (torch.randn(B, H, W, heads, D, generator=gen) * 25).half()
    key = (torch.randn(B, H, W, heads, D, generator=gen) * 25).half()
    v = torch.randn(B, H, W, heads, D, generator=gen).half()
    logits = (q.float() * key.float()).sum(-1)
    assert logits.abs().max() > 1e3
    out = sasa_triton.local_attention2d(q.to(device), key.to(device), v.to(device), kernel_size=k, backend="triton")
    assert torch.isfinite(out).all()
    expected = reference(q.double(), key.double(), v.double(), kernel_size=k)
    assert_close(out, expected, torch.float16, "y")


def test_nan_reaches_every_query_that_sees_it(device):
    """A NaN value reaches every query whose window holds it. (Like flash-attention, it can also
    reach other queries of the same tile: 0 * NaN in the tensor-core product; finite inputs
    always give finite outputs, see the poison and large-logit tests.)"""
    B, H, W, heads, D, k = 1, 7, 7, 1, 8, 3
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", device, torch.float32)
    v = v.clone()
    v[0, 0, 0, 0, 0] = float("nan")
    out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, backend="triton")
    nan_pixels = torch.isnan(out).any(-1).any(-1)[0].cpu()
    expected = torch.zeros(H, W, dtype=torch.bool)
    expected[:2, :2] = True  # the queries whose 3x3 window holds pixel (0, 0)
    assert torch.all(nan_pixels[expected])


def test_empty_batch(device):
    q = torch.randn(0, 4, 4, 2, 8, device=device)
    rel_rows, rel_cols = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    for t in (q, rel_rows, rel_cols):
        t.requires_grad_(True)
    out = sasa_triton.local_attention2d(q, q, q, rel_rows, rel_cols, kernel_size=3, backend="triton")
    assert out.shape == q.shape
    out.sum().backward()
    assert rel_rows.grad is not None and torch.all(rel_rows.grad == 0)


def test_backend_selection_on_cpu(monkeypatch):
    q = torch.randn(1, 4, 4, 1, 4, dtype=torch.float64)
    # float64 is reference-only; "reference" works anywhere.
    out = sasa_triton.local_attention2d(q, q, q, kernel_size=3, backend="reference")
    assert out.dtype == torch.float64
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton'"):
        sasa_triton.local_attention2d(q.float(), q.float(), q.float(), kernel_size=3, backend="triton")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("k,dilation", [(3, 1), (7, 1), (7, 2), (11, 1), (15, 1)])
def test_gpu_larger_shapes(dtype, k, dilation):
    B, H, W, heads, D = 2, 30, 27, 4, 32
    (q, key, v, rel_rows, rel_cols), ref_inputs = make_inputs(B, H, W, heads, D, k, "shared", "cuda", dtype)
    for t in (q, key, v, rel_rows, rel_cols, *ref_inputs):
        t.requires_grad_(True)
    out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k, dilation=dilation)
    expected = reference(*[t.cuda() for t in ref_inputs], kernel_size=k, dilation=dilation)
    assert_close(out, expected, dtype, "y")
    dy = torch.randn_like(expected)
    grads = torch.autograd.grad(out, (q, key, v, rel_rows, rel_cols), dy.to(dtype))
    expected_grads = torch.autograd.grad(expected, ref_inputs, dy)
    for name, g, e in zip(["dq", "dk", "dv", "drel_rows", "drel_cols"], grads, expected_grads):
        assert_close(g, e, dtype, name)


@pytest.mark.gpu
def test_gpu_backward_is_bitwise_repeatable():
    B, H, W, heads, D, k = 4, 28, 28, 8, 16, 7
    (q, key, v, rel_rows, rel_cols), _ = make_inputs(B, H, W, heads, D, k, "shared", "cuda", torch.bfloat16)
    for t in (q, key, v, rel_rows, rel_cols):
        t.requires_grad_(True)
    dy = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out = sasa_triton.local_attention2d(q, key, v, rel_rows, rel_cols, kernel_size=k)
        runs.append(torch.autograd.grad(out, (q, key, v, rel_rows, rel_cols), dy))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)
