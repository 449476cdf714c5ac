"""SelfAttention2d and the input validation of local_attention2d."""
import copy
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import sasa_triton
from sasa_triton import SelfAttention2d
from sasa_triton.reference import local_attention2d as reference

from helpers import assert_close, assert_module_under_autocast_matches_float64, autograd_graph_nodes


def manual_layer(layer, x):
    """SelfAttention2d written out with the float64 reference."""
    w = layer.qkv.weight.double()
    qkv = F.conv2d(x.double(), w)
    B, _, H, W = qkv.shape
    q, k, v = qkv.permute(0, 2, 3, 1).reshape(B, H, W, 3, layer.heads, layer.head_dim).unbind(3)
    y = reference(q, k, v, layer.rel_rows.double(), layer.rel_cols.double(), layer.kernel_size,
                  layer.dilation, layer.scale, layer.padding)
    y = y.reshape(B, H, W, -1).permute(0, 3, 1, 2)
    return F.avg_pool2d(y, layer.stride) if layer.stride > 1 else y


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("rel_per_head", [False, True])
def test_layer_matches_manual_composition(stride, memory_format, rel_per_head):
    torch.manual_seed(0)
    layer = SelfAttention2d(6, 8, kernel_size=3, stride=stride, heads=2, rel_per_head=rel_per_head,
                            backend="reference")
    x = torch.randn(2, 6, 7, 9).contiguous(memory_format=memory_format)
    out = layer(x)
    assert out.shape == (2, 8, 7 // stride, 9 // stride)
    assert_close(out, manual_layer(layer, x), torch.float32, "layer")


def test_layer_through_triton_kernels(device):
    torch.manual_seed(0)
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="triton").to(device)
    x = torch.randn(1, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    out = layer(x)
    assert_close(out, manual_layer(layer, x), torch.float32, "layer")
    out.square().sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_layer_gradient_reaches_the_projection_in_one_piece(device):
    """With channels_last input the op hands the qkv projection its gradient as one tensor:
    the backward stacks nothing (no UnbindBackward node between the op and the projection)."""
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="triton").to(device)
    x = torch.randn(1, 4, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    names = autograd_graph_nodes(layer(x).grad_fn)
    assert "ConvolutionBackward0" in names and "UnbindBackward0" not in names, names


def test_parameter_count_and_init():
    layer = SelfAttention2d(64, 128, kernel_size=7, heads=8)
    D = 128 // 8
    assert sum(p.numel() for p in layer.parameters()) == 3 * 64 * 128 + 7 * D
    assert layer.qkv.bias is None
    per_head = SelfAttention2d(64, 128, kernel_size=7, heads=8, rel_per_head=True)
    assert sum(p.numel() for p in per_head.parameters()) == 3 * 64 * 128 + 8 * 7 * D
    big = SelfAttention2d(8, 512, kernel_size=7, heads=8)
    std = torch.cat([big.rel_rows.flatten(), big.rel_cols.flatten()]).std().item()
    assert 0.5 * 64 ** -0.5 < std < 1.5 * 64 ** -0.5
    assert "kernel_size=7" in repr(layer)


def test_projection_output_is_a_free_view():
    """With channels_last input, q/k/v handed to the op are views of the projection output."""
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="reference")
    captured = {}
    original = sasa_triton.modules.local_attention2d

    def spy(q, k, v, *args, **kwargs):
        captured["views"] = (q, k, v)
        return original(q, k, v, *args, **kwargs)

    hook = layer.qkv.register_forward_hook(lambda m, i, o: captured.__setitem__("proj", o))
    sasa_triton.modules.local_attention2d = spy
    try:
        layer(torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last))
    finally:
        sasa_triton.modules.local_attention2d = original
        hook.remove()
    base = captured["proj"].untyped_storage().data_ptr()
    for t in captured["views"]:
        assert t.untyped_storage().data_ptr() == base
        assert t.stride(-1) == 1


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_channels=4, out_channels=6, heads=4), "heads"),
    (dict(in_channels=4, out_channels=8, kernel_size=4), "kernel_size"),
    (dict(in_channels=4, out_channels=8, kernel_size=0), "kernel_size"),
    (dict(in_channels=0, out_channels=8), "in_channels"),
    (dict(in_channels=4, out_channels=8, stride=0), "stride"),
    (dict(in_channels=4, out_channels=8, stride=3), "stride must be 1 or 2"),
    (dict(in_channels=4, out_channels=8, stride=4), "stride must be 1 or 2"),
    (dict(in_channels=4, out_channels=8, padding="reflect"), "padding"),
    (dict(in_channels=4, out_channels=8, backend="cuda"), "backend"),
    (dict(in_channels=4, out_channels=8, heads=8), "must be >= 2"),
    (dict(in_channels=4, out_channels=8, scale=float("nan")), "scale must be finite"),
])
def test_layer_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SelfAttention2d(**kwargs)


@pytest.mark.parametrize("layer_kwargs,make_x,error,match", [
    pytest.param({}, lambda: torch.randn(1, 5, 6, 6), ValueError, "x has 5 channels.*in_channels=4", id="channels"),
    pytest.param({}, lambda: torch.randn(4, 6, 6), ValueError, "x must have shape", id="rank3"),
    pytest.param({}, lambda: [1, 2, 3], TypeError, "x must be a torch.Tensor", id="list"),
    pytest.param({}, lambda: torch.randint(0, 3, (1, 4, 6, 6)), TypeError, "x must be a floating-point tensor",
                 id="int64"),
    pytest.param({}, lambda: torch.ones(1, 4, 6, 6, dtype=torch.bool), TypeError, "x must be a floating-point",
                 id="bool"),
    pytest.param({}, lambda: torch.randn(1, 4, 6, 6, dtype=torch.float64), TypeError,
                 "x has dtype torch.float64 but the layer's parameters are torch.float32", id="f64-into-f32"),
    pytest.param({}, lambda: torch.randn(1, 4, 6, 6, dtype=torch.float16), TypeError,
                 "x has dtype torch.float16 but the layer's parameters are torch.float32", id="f16-into-f32"),
    pytest.param(dict(stride=2), lambda: torch.randn(1, 4, 1, 1), ValueError,
                 r"x must have height and width >= stride \(2\), got 1x1", id="1x1-stride2"),
    pytest.param(dict(stride=2), lambda: torch.randn(1, 4, 6, 1), ValueError, "got 6x1", id="6x1-stride2"),
    pytest.param({}, lambda: torch.randn(1, 4, 0, 6), ValueError, r"x must have height and width >= stride \(1\)",
                 id="empty-image"),
    pytest.param(dict(device="meta"), lambda: torch.randn(1, 4, 6, 6), ValueError,
                 "x is on cpu but the layer's parameters are on meta", id="device"),
])
def test_layer_rejects_bad_input(layer_kwargs, make_x, error, match):
    layer_kwargs = dict(layer_kwargs)
    device = layer_kwargs.pop("device", "cpu")
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="reference", **layer_kwargs).to(device)
    with pytest.raises(error, match=match):
        layer(make_x())


def test_float64_layer_needs_the_reference_backend(device):
    """As nn.Conv2d: a .double() layer takes float64 input; the Triton kernels do not, and say so."""
    torch.manual_seed(0)
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, stride=2, backend="reference").double().to(device)
    x = torch.randn(1, 4, 5, 7, dtype=torch.float64, device=device)
    out = layer(x)
    assert out.dtype == torch.float64 and out.shape == (1, 8, 2, 3)
    torch.testing.assert_close(out, manual_layer(layer, x), rtol=1e-12, atol=1e-12)
    layer.backend = "triton"
    with pytest.raises(TypeError, match="x is float64.*backend='reference'"):
        layer(x)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=["f32", "f16"])
def test_layer_under_autocast_runs_in_the_autocast_dtype(x_dtype):
    """Under autocast (as nn.Conv2d) x and the layer may differ in dtype, float64 excepted."""
    torch.manual_seed(0)
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="reference")
    x = torch.randn(1, 4, 5, 6).to(x_dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        with pytest.raises(TypeError, match="x has dtype torch.float64.*autocast never casts float64"):
            layer(x.double())
    assert out.dtype == torch.bfloat16
    expected = manual_layer(layer, x)
    rms = ((out.double() - expected).square().mean() / expected.square().mean()).sqrt()
    assert rms < 3e-2, rms


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_layer_under_autocast_matches_float64(dtype, device):
    """SelfAttention2d (Triton path) under autocast against float64: y and the gradients of x and
    of every parameter (the projection, both tables), each element within the suite's bound of
    PyTorch's own error under the same autocast (the reference backend). On a GPU at k = 7 with 8
    heads; under the interpreter (which computes a bf16 op in fp32) a small layer."""
    torch.manual_seed(0)
    if device.type == "cuda":
        layer, shape = SelfAttention2d(32, 64, kernel_size=7, heads=8, backend="triton"), (2, 32, 20, 20)
    else:
        layer, shape = SelfAttention2d(8, 16, kernel_size=3, heads=2, backend="triton"), (1, 8, 5, 6)
    assert_module_under_autocast_matches_float64(layer.to(device), shape, dtype, device, seed=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bf16 detour (CPU only)")
def test_triton_layer_under_cpu_autocast_bf16():
    """Under the interpreter the bf16 op computes in fp32; CPU autocast must not cast those fp32
    copies back to bf16 (that recursed without end)."""
    torch.manual_seed(0)
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="triton")
    x = torch.randn(1, 4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = manual_layer(layer, x)
    rms = ((out.double() - expected).square().mean() / expected.square().mean()).sqrt()
    assert rms < 3e-2, rms


def _ok():
    q = torch.randn(1, 4, 4, 2, 8)
    return dict(q=q, k=q.clone(), v=q.clone(), rel_rows=torch.randn(3, 4), rel_cols=torch.randn(3, 4), kernel_size=3)


@pytest.mark.parametrize("change,error,match", [
    (dict(q=torch.randn(4, 4, 2, 8)), ValueError, "q must have rank 5"),
    (dict(k=torch.randn(1, 4, 5, 2, 8)), ValueError, "k must have the shape"),
    (dict(v=torch.randn(1, 4, 4, 2, 4)), ValueError, "v must have the shape"),
    (dict(kernel_size=4), ValueError, "kernel_size must be a positive odd"),
    (dict(kernel_size=-3), ValueError, "kernel_size must be a positive odd"),
    (dict(kernel_size=3.0), TypeError, "kernel_size must be an int"),
    (dict(dilation=0), ValueError, "dilation"),
    (dict(rel_rows=torch.randn(3, 5)), ValueError, "rel_rows must have shape"),
    (dict(rel_cols=torch.randn(4, 3, 4)), ValueError, "rel_cols must have shape"),
    (dict(rel_cols=None), ValueError, "rel_rows and rel_cols"),
    (dict(padding="same"), ValueError, "padding"),
    (dict(backend="cudnn"), ValueError, "backend"),
    (dict(q=torch.randint(0, 3, (1, 4, 4, 2, 8))), TypeError, "q must be a floating-point"),
    (dict(k=torch.randn(1, 4, 4, 2, 8).double()), TypeError, "share a dtype"),
    (dict(scale="big"), TypeError, "scale"),
    (dict(scale=float("nan")), ValueError, "scale must be finite"),
    (dict(scale=float("-inf")), ValueError, "scale must be finite"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
])
def test_op_rejects_bad_input(change, error, match):
    args = _ok()
    args.update(change)
    backend = args.pop("backend", "reference")
    with pytest.raises(error, match=match):
        sasa_triton.local_attention2d(**args, backend=backend)


def test_op_checks_the_scale_of_every_call(device):
    """The op checks its arguments once per kind of call (shapes, dtypes, options); a non-finite
    scale still raises after a finite one made that kind known."""
    q = torch.randn(1, 4, 4, 2, 8, device=device)
    sasa_triton.local_attention2d(q, q, q, kernel_size=3, scale=0.5, backend="triton")
    for scale in (float("nan"), float("inf"), np.float64("nan")):
        with pytest.raises(ValueError, match="scale must be finite"):
            sasa_triton.local_attention2d(q, q, q, kernel_size=3, scale=scale, backend="triton")
    with pytest.raises(TypeError, match="scale must be a float, got Tensor"):
        sasa_triton.local_attention2d(q, q, q, kernel_size=3, scale=torch.ones(2), backend="triton")


def test_op_rejects_device_mismatch():
    args = _ok()
    args["rel_rows"] = args["rel_rows"].to("meta")
    with pytest.raises(ValueError, match="rel_rows is on meta"):
        sasa_triton.local_attention2d(**args)


def test_triton_path_rejects_float64(device):
    q = torch.randn(1, 4, 4, 1, 8, dtype=torch.float64, device=device)
    with pytest.raises(TypeError, match="float64"):
        sasa_triton.local_attention2d(q, q, q, kernel_size=3, backend="triton")


def test_layer_gradient_penalty_matches_the_reference(device):
    """A gradient penalty through SelfAttention2d (channels_last x: q, k, v the parts of one
    projection, whose gradient the op hands back in one piece): the input's gradient with
    create_graph=True, then the penalty's gradients of the input and every parameter, against the
    same layer on the float64 reference."""
    from helpers import assert_penalty_gradients

    torch.manual_seed(0)
    layer = SelfAttention2d(8, 8, kernel_size=3, heads=2, backend="triton").to(device)
    twin = copy.deepcopy(layer)
    twin.backend = "reference"
    names = ["x", *(name for name, _ in layer.named_parameters())]

    def through(module):
        def fn(x, *params):
            return torch.func.functional_call(module, dict(zip(names[1:], params)), (x,))
        return fn

    x = torch.randn(2, 8, 5, 6, device=device).contiguous(memory_format=torch.channels_last)
    assert_penalty_gradients(through(layer), through(twin), [x, *layer.parameters()], names)
