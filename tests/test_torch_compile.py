"""torch.compile (fullgraph, no recompiles), fake tensors / export, autocast and layouts.

On CPU the registered op runs its Triton kernels through the interpreter; the ops are defined
with torch.library's low-level API (sasa_triton._library), a triton_op that Inductor traces into
only with SASA_TRITON_TRITON_OP=1.
"""
import pytest
import torch
import torch._dynamo.testing

import sasa_triton
from sasa_triton import SelfAttention2d

from helpers import assert_close


def compiled_counter(module, **kwargs):
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    return torch.compile(module, backend=counter, fullgraph=True, **kwargs), counter


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters()}


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_fullgraph_matches_eager(backend, memory_format, device):
    torch.manual_seed(0)
    layer = SelfAttention2d(4, 8, kernel_size=3, stride=2, heads=2, backend=backend).to(device)
    x = torch.randn(2, 4, 6, 5, device=device).contiguous(memory_format=memory_format).requires_grad_(True)
    compiled, counter = compiled_counter(layer)
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads, dx = grads_of(layer), x.grad.clone()
    layer.zero_grad()
    x.grad = None
    expected = layer(x)
    expected.square().sum().backward()
    assert counter.frame_count == 1
    assert_close(out, expected, torch.float32, "y")
    assert_close(dx, x.grad, torch.float32, "dx")
    for name, g in grads_of(layer).items():
        assert_close(compiled_grads[name], g, torch.float32, name)


def test_no_recompile_across_batches_of_one_image_size(device):
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="triton").to(device)
    compiled, counter = compiled_counter(layer)
    for batch in (2, 3, 4):  # (batch 1 would specialize: sizes 0/1 are always static)
        x = torch.randn(batch, 4, 4, 4, device=device)
        torch._dynamo.mark_dynamic(x, 0)
        out = compiled(x)
        assert out.shape == (batch, 8, 4, 4)
    assert counter.frame_count == 1


def test_registered_local_ops_pass_opcheck(device):
    """The forward and backward ops as torch.library registers them (schema, fake kernel,
    autograd registration, AOT dispatch with dynamic shapes) pass torch.library.opcheck."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 5, 6, 2, 8, generator=gen).to(device) for _ in range(3))
    rel_rows, rel_cols = (torch.randn(3, 4, generator=gen).to(device) for _ in range(2))
    options = (3, 1, 1.0, "zeros")
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, rel_rows, rel_cols)]
    torch.library.opcheck(torch.ops.sasa_triton.local_attention2d_fwd.default, (*leaves, *options))
    y, lse = torch.ops.sasa_triton.local_attention2d_fwd(q, k, v, rel_rows, rel_cols, *options)
    torch.library.opcheck(torch.ops.sasa_triton.local_attention2d_bwd.default,
                          (q, k, v, rel_rows, rel_cols, y, lse, torch.randn_like(y), *options))


def test_fake_tensor_shapes_and_export(device):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q = torch.randn(2, 5, 6, 2, 8, device=device)
    rel_rows, rel_cols = torch.randn(3, 4, device=device), torch.randn(3, 4, device=device)
    with FakeTensorMode() as mode:
        fq, frr, frc = (mode.from_tensor(t) for t in (q, rel_rows, rel_cols))
        y, lse = torch.ops.sasa_triton.local_attention2d_fwd(fq, fq, fq, frr, frc, 3, 1, 1.0, "zeros")
        assert y.shape == q.shape and y.dtype == q.dtype
        assert lse.shape == (2, 2, 5, 6) and lse.dtype == torch.float32
        grads = torch.ops.sasa_triton.local_attention2d_bwd(fq, fq, fq, frr, frc, y, lse, y, 3, 1, 1.0, "zeros")
        assert [g.shape for g in grads] == [q.shape] * 3 + [rel_rows.shape, rel_cols.shape]

    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="triton").to(device)
    exported = torch.export.export(layer, (torch.randn(1, 4, 5, 5, device=device),))
    assert "sasa_triton.local_attention2d_fwd" in str(exported.graph)
    x = torch.randn(1, 4, 5, 5, device=device)
    assert_close(exported.module()(x), layer(x), torch.float32, "exported")


def test_autocast_cpu_runs_in_bf16_and_keeps_parameter_grads_fp32():
    """Autocast on CPU with the reference path (the kernels' bf16 autocast test is GPU-only)."""
    layer = SelfAttention2d(4, 8, kernel_size=3, heads=2, backend="reference")
    x = torch.randn(1, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad.dtype == torch.float32 for p in layer.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_autocast_module(dtype):
    torch.manual_seed(0)
    layer = SelfAttention2d(32, 64, kernel_size=7, heads=8).cuda()
    x = torch.randn(2, 32, 20, 20, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=dtype):
        out = layer(x)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    for p in layer.parameters():
        assert p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
    # The op on fp32 inputs under autocast runs in the autocast dtype too.
    q = torch.randn(1, 9, 9, 2, 16, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        y = sasa_triton.local_attention2d(q, q, q, kernel_size=3)
    assert y.dtype == dtype


@pytest.mark.gpu
def test_gpu_inductor_fullgraph():
    torch.manual_seed(0)
    layer = SelfAttention2d(32, 64, kernel_size=7, heads=8).cuda()
    x = torch.randn(2, 32, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
    compiled = torch.compile(layer, fullgraph=True)
    out = compiled(x)
    expected = layer(x)
    assert_close(out, expected, torch.float32, "inductor")
    out.sum().backward()


@pytest.mark.gpu
def test_gpu_reduce_overhead_training_steps_match_eager():
    """The README's advice for small feature maps: torch.compile(mode="reduce-overhead") (Inductor's
    CUDA graphs) around a SASA layer trains as the eager layer does, replays included."""
    torch.manual_seed(0)
    layer = SelfAttention2d(32, 64, kernel_size=7, heads=8).cuda()
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, recording, then replays
        x = torch.randn(2, 32, 14, 14, device="cuda").contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        out = compiled(x)
        out.square().sum().backward()
        got = (out.detach().clone(), x.grad.clone(), grads_of(layer))
        layer.zero_grad(set_to_none=True)
        x.grad = None
        expected = layer(x)
        expected.square().sum().backward()
        assert_close(got[0], expected, torch.float32, f"y, step {step}")
        assert_close(got[1], x.grad, torch.float32, f"dx, step {step}")
        for name, g in grads_of(layer).items():
            assert_close(got[2][name], g, torch.float32, f"{name}, step {step}")
        layer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("window", ["block", "sliding"])
def test_stem_fullgraph_matches_eager(window, device):
    torch.manual_seed(0)
    layer = sasa_triton.SpatialAttention2d(3, 8, block_size=2, heads=2, mixtures=2, window=window,
                                           backend="triton").to(device)
    x = torch.randn(1, 3, 6, 5, device=device)
    compiled, counter = compiled_counter(layer)
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = grads_of(layer)
    layer.zero_grad()
    expected = layer(x)
    expected.square().sum().backward()
    assert counter.frame_count == 1
    assert_close(out, expected, torch.float32, "y")
    for name, g in grads_of(layer).items():
        assert_close(compiled_grads[name], g, torch.float32, name)


@pytest.mark.parametrize("stem", ["conv", "attention"])
def test_sasa_resnet_fullgraph_matches_eager(stem, device):
    """A (tiny) SASA-ResNet through the Triton kernels compiles with fullgraph=True and matches
    eager, forward and backward."""
    from sasa_triton.models import ResNet

    torch.manual_seed(0)
    net = ResNet((1, 1), num_classes=5, stem=stem, base_width=8, heads=2, kernel_size=3, stem_heads=2,
                 stem_mixtures=2, backend="triton").to(device)
    x = torch.randn(2, 3, 16, 16, device=device).contiguous(memory_format=torch.channels_last)
    compiled, counter = compiled_counter(net)
    out = compiled(x)
    out.square().sum().backward()
    compiled_grads = grads_of(net)
    net.zero_grad()
    expected = net(x)
    expected.square().sum().backward()
    assert counter.frame_count == 1
    assert_close(out, expected, torch.float32, "logits")
    for name, g in grads_of(net).items():
        assert_close(compiled_grads[name], g, torch.float32, name)
