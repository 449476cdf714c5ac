"""SpatialAttention2d and AttentionStem: shapes, parameters, validation and gradients."""
import pytest
import torch

import sasa_triton
from sasa_triton import AttentionStem, SpatialAttention2d

from helpers import assert_close, assert_module_under_autocast_matches_float64


def expected_parameter_count(in_channels, out_channels, block_size, heads, mixtures, embed_dim=None):
    """Fused bias-free 1x1 projection to q, k and M value maps; emb_row, emb_col (block_size x E)
    and nu (M x E), E = out_channels // heads by default."""
    E = embed_dim or out_channels // heads
    return in_channels * (2 + mixtures) * out_channels + 2 * block_size * E + mixtures * E


def test_stem_maps_224_to_56_as_resnets_stem():
    torch.manual_seed(0)
    stem = AttentionStem(in_channels=3, out_channels=64, block_size=4, heads=4, mixtures=4, pool=4,
                         backend="reference")
    out = stem(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 64, 56, 56)
    assert (out >= 0).all()  # after the ReLU
    assert isinstance(stem.norm, torch.nn.BatchNorm2d) and isinstance(stem.pool, torch.nn.MaxPool2d)


@pytest.mark.parametrize("window", ["block", "sliding"])
def test_layer_keeps_the_spatial_size(window):
    layer = SpatialAttention2d(3, 64, block_size=4, heads=4, mixtures=4, window=window, backend="reference")
    out = layer(torch.randn(2, 3, 18, 13))
    assert out.shape == (2, 64, 18, 13)
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("in_channels,out_channels,block_size,heads,mixtures,embed_dim", [
    pytest.param(3, 64, 4, 4, 4, None, id="paper-3-64-bs4-h4-M4"),
    pytest.param(5, 24, 3, 2, 2, None, id="5-24-bs3-h2-M2"),
    pytest.param(3, 32, 4, 8, 3, 6, id="3-32-bs4-h8-M3-E6"),
])
def test_parameter_count(in_channels, out_channels, block_size, heads, mixtures, embed_dim):
    layer = SpatialAttention2d(in_channels, out_channels, block_size=block_size, heads=heads, mixtures=mixtures,
                               embed_dim=embed_dim)
    expected = expected_parameter_count(in_channels, out_channels, block_size, heads, mixtures, embed_dim)
    assert sum(p.numel() for p in layer.parameters()) == expected
    stem = AttentionStem(in_channels, out_channels, block_size=block_size, heads=heads, mixtures=mixtures,
                         embed_dim=embed_dim)
    assert sum(p.numel() for p in stem.parameters()) == expected + 2 * out_channels  # + BatchNorm's affine
    assert layer.qkv.bias is None


def test_mixture_weights_are_a_softmax_over_m():
    layer = SpatialAttention2d(3, 16, block_size=4, heads=2, mixtures=3)
    p = layer.mixture_weights()
    assert p.shape == (4, 4, 3)
    torch.testing.assert_close(p.sum(-1), torch.ones(4, 4))
    a, b = 1, 2
    expected = torch.softmax((layer.emb_row[a] + layer.emb_col[b]) @ layer.nu.t(), dim=-1)
    torch.testing.assert_close(p[a, b], expected)


def test_layer_matches_its_definition():
    """The module is the fused projection, the mixture table and the op, nothing else."""
    torch.manual_seed(1)
    layer = SpatialAttention2d(3, 8, block_size=2, heads=2, mixtures=3, backend="reference").double()
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64)
    w = layer.qkv.weight[:, :, 0, 0]  # ((2 + M) * C, C_in)
    proj = torch.einsum("oc,bchw->bhwo", w, x).unflatten(-1, (5, 2, 4))
    expected = sasa_triton.reference.spatial_attention2d(proj[..., 0, :, :], proj[..., 1, :, :], proj[..., 2:, :, :],
                                                         layer.mixture_weights(), block_size=2)
    torch.testing.assert_close(layer(x), expected.reshape(1, 4, 6, 8).permute(0, 3, 1, 2))


@pytest.mark.parametrize("window", ["block", "sliding"])
def test_forward_backward_reaches_every_parameter(window, device):
    """Triton backend (interpreter without CUDA) against the reference backend: output and the
    gradients of the projection and of emb_row, emb_col, nu (through the mixture table)."""
    torch.manual_seed(2)
    kwargs = dict(block_size=2, heads=2, mixtures=2, window=window, padding="zeros")
    layer = SpatialAttention2d(3, 8, backend="triton", **kwargs).to(device)
    reference_layer = SpatialAttention2d(3, 8, backend="reference", **kwargs).double()
    reference_layer.load_state_dict({k: v.double() for k, v in layer.state_dict().items()})
    x = torch.randn(1, 3, 3, 5, dtype=torch.float64)
    out = layer(x.float().to(device))
    expected = reference_layer(x)
    assert_close(out, expected, torch.float32, "y")
    dy = torch.randn_like(expected)
    out.backward(dy.float().to(device))
    expected.backward(dy)
    for (name, p), (_, p_ref) in zip(layer.named_parameters(), reference_layer.named_parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        assert_close(p.grad, p_ref.grad, torch.float32, name)


def test_stem_backward_trains_the_mixture_embeddings():
    stem = AttentionStem(3, 16, block_size=4, heads=2, mixtures=4, pool=2, backend="reference")
    stem(torch.randn(2, 3, 8, 8)).square().mean().backward()
    for p in (stem.attention.emb_row, stem.attention.emb_col, stem.attention.nu, stem.attention.qkv.weight):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


BAD_CONSTRUCTOR_ARGS = [
    pytest.param(dict(in_channels=0), ValueError, "in_channels", id="in_channels-0"),
    pytest.param(dict(in_channels=3.0), TypeError, "in_channels", id="in_channels-float"),
    pytest.param(dict(out_channels=-8), ValueError, "out_channels", id="out_channels-negative"),
    pytest.param(dict(heads=3), ValueError, r"heads \(3\) must divide out_channels \(8\)", id="heads-not-dividing"),
    pytest.param(dict(block_size=0), ValueError, "block_size", id="block_size-0"),
    pytest.param(dict(block_size="4"), TypeError, "block_size", id="block_size-str"),
    pytest.param(dict(mixtures=0), ValueError, "mixtures", id="mixtures-0"),
    pytest.param(dict(window="global"), ValueError, "window", id="window"),
    pytest.param(dict(padding="reflect"), ValueError, "padding", id="padding"),
    pytest.param(dict(backend="cuda"), ValueError, "backend", id="backend"),
    pytest.param(dict(scale="1"), TypeError, "scale", id="scale-str"),
    pytest.param(dict(scale=float("inf")), ValueError, "scale must be finite", id="scale-inf"),
    pytest.param(dict(embed_dim=0), ValueError, "embed_dim", id="embed_dim-0"),
]


@pytest.mark.parametrize("overrides,error,message", BAD_CONSTRUCTOR_ARGS)
def test_bad_constructor_arguments_raise_naming_the_argument(overrides, error, message):
    args = dict(in_channels=3, out_channels=8, block_size=2, heads=2, mixtures=2)
    args.update(overrides)
    with pytest.raises(error, match=message):
        SpatialAttention2d(**args)


def test_bad_stem_pool_raises():
    with pytest.raises(ValueError, match="pool"):
        AttentionStem(3, 8, heads=2, pool=0)


@pytest.mark.parametrize("x,error,message", [
    pytest.param(torch.randn(1, 4, 8, 8), ValueError, "in_channels=3", id="channels-mismatch"),
    pytest.param(torch.randn(3, 8, 8), ValueError, r"\(B, C, H, W\)", id="rank-3"),
    pytest.param([[1.0]], TypeError, "torch.Tensor", id="not-a-tensor"),
])
def test_bad_input_raises(x, error, message):
    layer = SpatialAttention2d(3, 8, block_size=2, heads=2, mixtures=2, backend="reference")
    with pytest.raises(error, match=message):
        layer(x)
    with pytest.raises(error, match=message):
        AttentionStem(3, 8, block_size=2, heads=2, mixtures=2, backend="reference")(x)


def test_mix_of_the_wrong_shape_is_refused():
    q = torch.randn(1, 4, 4, 2, 4)
    values = torch.randn(1, 4, 4, 2, 2, 4)
    with pytest.raises(ValueError, match=r"mix must have shape \(block_size, block_size, M\) = \(4, 4, 2\)"):
        sasa_triton.spatial_attention2d(q, q, values, torch.ones(4, 4, 3) / 3, block_size=4)
    with pytest.raises(ValueError, match="mix must have shape"):
        sasa_triton.spatial_attention2d(q, q, values, torch.ones(2, 2, 2) / 2, block_size=4)


def test_extra_repr():
    text = repr(AttentionStem(3, 64))
    assert "3, 64, block_size=4, heads=4, mixtures=4, window='block', padding='zeros', scale=1.0, embed_dim=16" in text
    assert "pool=4" in text


def test_stem_under_bf16_autocast_matches_float64(device):
    """The stem's attention under bf16 autocast (bf16 activations, fp32 parameters) against the
    float64 reference: y and the gradients of x and of every parameter, each element within the
    suite's bound of PyTorch's own error under the same autocast (the reference backend). On a GPU
    the paper's stem at 224 x 224; under the interpreter (which computes the bf16 op in fp32) a
    small one."""
    torch.manual_seed(3)
    if device.type == "cuda":
        stem, shape = AttentionStem(backend="triton"), (2, 3, 224, 224)
    else:
        stem, shape = AttentionStem(3, 16, block_size=3, heads=2, mixtures=3, backend="triton"), (1, 3, 7, 8)
    assert_module_under_autocast_matches_float64(stem.attention.to(device), shape, torch.bfloat16, device, seed=4)
