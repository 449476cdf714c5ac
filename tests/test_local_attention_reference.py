"""The PyTorch reference of local_attention2d against a direct float64 loop over SPEC section 1."""
import math

import pytest
import torch

from sasa_triton.reference import local_attention2d as reference

from helpers import UNIT_ROUNDOFF, reference_in_dtype


def direct_loop(q, k, v, rel_rows, rel_cols, kernel_size, dilation, scale, padding):
    """The definition, one query and one window tap at a time (obviously correct, very slow)."""
    B, H, W, heads, D = q.shape
    d_rows = D // 2
    half = kernel_size // 2
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(H):
            for j in range(W):
                for h in range(heads):
                    logits, values = [], []
                    for t_row in range(kernel_size):
                        for t_col in range(kernel_size):
                            a = i + (t_row - half) * dilation
                            c = j + (t_col - half) * dilation
                            inside = 0 <= a < H and 0 <= c < W
                            if not inside and padding == "mask":
                                continue
                            key = k[b, a, c, h] if inside else torch.zeros(D, dtype=q.dtype)
                            value = v[b, a, c, h] if inside else torch.zeros(D, dtype=q.dtype)
                            logit = float(q[b, i, j, h] @ key)
                            if rel_rows is not None:
                                rr = rel_rows[h] if rel_rows.dim() == 3 else rel_rows
                                rc = rel_cols[h] if rel_cols.dim() == 3 else rel_cols
                                logit += float(q[b, i, j, h, :d_rows] @ rr[t_row])
                                logit += float(q[b, i, j, h, d_rows:] @ rc[t_col])
                            logits.append(scale * logit)
                            values.append(value)
                    m = max(logits)
                    weights = [math.exp(x - m) for x in logits]
                    total = sum(weights)
                    out[b, i, j, h] = sum(w / total * val for w, val in zip(weights, values))
    return out


CASES = [
    # B, H, W, heads, D, k, dilation, padding, rel
    pytest.param(1, 5, 6, 2, 4, 3, 1, "zeros", "shared", id="B1-H5-W6-h2-D4-k3-d1-zeros-shared"),
    pytest.param(2, 4, 3, 1, 5, 5, 1, "mask", "per_head", id="B2-H4-W3-h1-D5-k5-d1-mask-perhead"),
    pytest.param(1, 6, 5, 2, 3, 3, 2, "zeros", "per_head", id="B1-H6-W5-h2-D3-k3-d2-zeros-perhead"),
    pytest.param(1, 3, 7, 1, 4, 7, 1, "mask", "shared", id="B1-H3-W7-h1-D4-k7-d1-mask-shared-H<k"),
    pytest.param(1, 4, 4, 2, 4, 3, 1, "zeros", None, id="B1-H4-W4-h2-D4-k3-d1-zeros-norel"),
    pytest.param(1, 5, 5, 1, 2, 5, 2, "mask", None, id="B1-H5-W5-h1-D2-k5-d2-mask-norel"),
]


def make_inputs(B, H, W, heads, D, k, rel, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, key, v = (torch.randn(B, H, W, heads, D, generator=gen, dtype=dtype) for _ in range(3))
    if rel is None:
        return q, key, v, None, None
    lead = (heads,) if rel == "per_head" else ()
    rel_rows = torch.randn(*lead, k, D // 2, generator=gen, dtype=dtype)
    rel_cols = torch.randn(*lead, k, D - D // 2, generator=gen, dtype=dtype)
    return q, key, v, rel_rows, rel_cols


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel", CASES)
@pytest.mark.parametrize("scale", [0.37])
def test_reference_matches_definition(B, H, W, heads, D, k, dilation, padding, rel, scale):
    q, key, v, rel_rows, rel_cols = make_inputs(B, H, W, heads, D, k, rel)
    expected = direct_loop(q, key, v, rel_rows, rel_cols, k, dilation, scale, padding)
    actual = reference(q, key, v, rel_rows, rel_cols, k, dilation, scale, padding)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


def test_zero_padding_differs_from_mask_at_borders():
    q, key, v, rel_rows, rel_cols = make_inputs(1, 5, 5, 1, 4, 3, "shared")
    zeros = reference(q, key, v, rel_rows, rel_cols, 3, 1, 1.0, "zeros")
    mask = reference(q, key, v, rel_rows, rel_cols, 3, 1, 1.0, "mask")
    # Interior pixels see no padding, border pixels do.
    torch.testing.assert_close(zeros[:, 1:-1, 1:-1], mask[:, 1:-1, 1:-1])
    assert not torch.allclose(zeros[:, 0], mask[:, 0])


@pytest.mark.parametrize("padding", ["zeros", "mask"])
@pytest.mark.parametrize("rel", ["shared", "per_head"])
def test_reference_gradcheck(padding, rel):
    q, key, v, rel_rows, rel_cols = make_inputs(1, 4, 3, 2, 4, 3, rel)
    inputs = tuple(t.requires_grad_(True) for t in (q, key, v, rel_rows, rel_cols))
    fn = lambda *xs: reference(*xs, kernel_size=3, dilation=1, scale=0.5, padding=padding)
    assert torch.autograd.gradcheck(fn, inputs)


def test_reference_keeps_low_precision_dtype():
    q, key, v, rel_rows, rel_cols = make_inputs(1, 4, 4, 1, 4, 3, "shared", dtype=torch.float32)
    out = reference(q.half(), key.half(), v.half(), rel_rows, rel_cols, 3)
    assert out.dtype == torch.float16
    expected = reference(q.double(), key.double(), v.double(), rel_rows.double(), rel_cols.double(), 3)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("B,H,W,heads,D,k,dilation,padding,rel", CASES)
def test_reference_in_dtype_is_the_same_function(B, H, W, heads, D, k, dilation, padding, rel):
    """helpers.reference_in_dtype (the yardstick of the kernels' tests) in float64: the reference's
    values and gradients."""
    inputs = [t if t is None else t.requires_grad_(True) for t in make_inputs(B, H, W, heads, D, k, rel)]
    present = [t for t in inputs if t is not None]
    options = dict(kernel_size=k, dilation=dilation, scale=0.37, padding=padding)
    actual = reference_in_dtype(*inputs, **options)
    expected = reference(*inputs, **options)
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(expected)
    for a, e in zip(torch.autograd.grad(actual, present, dy), torch.autograd.grad(expected, present, dy)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_reference_in_dtype_computes_in_dtype(dtype):
    """In a low dtype it returns that dtype, with an error of that dtype's order: more than a
    rounding of the float64 result (its intermediates are rounded too), less than 8 units of
    roundoff in RMS."""
    q, key, v, rel_rows, rel_cols = make_inputs(1, 6, 7, 2, 16, 5, "shared")
    expected = reference(q, key, v, rel_rows, rel_cols, kernel_size=5)
    actual = reference_in_dtype(q.to(dtype), key.to(dtype), v.to(dtype), rel_rows.float(), rel_cols.float(),
                                kernel_size=5)
    assert actual.dtype == dtype
    exact = reference(*(t.to(dtype).double() for t in (q, key, v)), rel_rows.float().double(),
                      rel_cols.float().double(), kernel_size=5)
    u = UNIT_ROUNDOFF[dtype]
    rms = exact.pow(2).mean().sqrt()
    error = (actual.double() - exact).pow(2).mean().sqrt() / (u * rms)
    rounding = (exact.to(dtype).double() - exact).pow(2).mean().sqrt() / (u * rms)
    assert rounding < error < 8, (rounding.item(), error.item())
