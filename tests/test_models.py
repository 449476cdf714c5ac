"""SASA ResNets (SPEC section 3): parameter counts against the paper, shapes, channels_last,
state-dict round trips, convert_to_sasa and FLOP counting, on the reference backend; one whole model
through the Triton kernels against float64."""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

from sasa_triton import AttentionStem, SelfAttention2d, models

# Paper, table 1 (millions of parameters).
PAPER_PARAMS = {
    ("conv", 26): 13.7, ("conv", 38): 19.6, ("conv", 50): 25.6,
    ("sasa", 26): 10.3, ("sasa", 38): 14.1, ("sasa", 50): 18.0,
}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build(kind: str, depth: int, stem: str = "conv", **kwargs) -> nn.Module:
    if kind == "conv":
        return getattr(models, f"resnet{depth}")(**kwargs)
    return getattr(models, f"sasa_resnet{depth}")(stem=stem, **kwargs)


MODEL_IDS = [("conv", d, "conv") for d in (26, 38, 50)] + [("sasa", d, s) for d in (26, 38, 50)
                                                            for s in ("conv", "attention")]


@pytest.mark.parametrize("kind,depth,stem", [pytest.param(*m, id=f"{m[0]}{m[1]}-{m[2]}stem") for m in MODEL_IDS])
def test_param_counts_match_paper(kind, depth, stem):
    with torch.device("meta"):  # shapes only: instant
        model = build(kind, depth, stem)
    count = n_params(model) / 1e6
    expected = PAPER_PARAMS[(kind, depth)]
    assert abs(count - expected) / expected < 0.02, f"{kind}{depth} ({stem} stem): {count:.2f} M vs paper {expected} M"


def test_resnet50_is_torchvision_layout():
    with torch.device("meta"):
        model = models.resnet50()
    assert n_params(model) == 25_557_032  # torchvision.models.resnet50()
    keys = set(model.state_dict())
    for key in ("conv1.weight", "bn1.running_mean", "layer1.0.conv2.weight", "layer2.0.downsample.0.weight",
                "layer4.2.bn3.weight", "fc.weight", "fc.bias"):
        assert key in keys


def test_attention_layers_replace_every_3x3():
    with torch.device("meta"):
        model = models.sasa_resnet50(stem="attention")
    attn = [m for m in model.modules() if isinstance(m, SelfAttention2d)]
    assert len(attn) == 16
    assert all(m.kernel_size == 7 and m.heads == 8 for m in attn)
    assert not [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1)]
    assert isinstance(model.stem, AttentionStem)
    strided = [m for m in attn if m.stride == 2]
    assert len(strided) == 3


def small_sasa(stem="conv", **kwargs):
    kwargs.setdefault("backend", "reference")
    return models.ResNet((1, 1, 1, 1), num_classes=10, stem=stem, base_width=16, heads=4, kernel_size=3, **kwargs)


@pytest.mark.parametrize("stem", ["conv", "attention"])
def test_forward_shape_resnet26(stem):
    torch.manual_seed(0)
    model = models.sasa_resnet26(stem=stem, num_classes=10, backend="reference").eval()
    with torch.no_grad():
        y = model(torch.randn(1, 3, 64, 64))
    assert y.shape == (1, 10)
    assert torch.isfinite(y).all()
    assert model.forward_features(torch.randn(1, 3, 64, 64)).shape == (1, 2048, 2, 2)


@pytest.mark.parametrize("kind", ["conv", "sasa-conv", "sasa-attention", "sasa-small"])
def test_small_models_forward_backward(kind):
    torch.manual_seed(0)
    if kind == "conv":
        model = models.ResNet((1, 1, 1, 1), num_classes=10, attention=False, base_width=16)
    else:
        model = small_sasa(stem=kind.split("-")[1])
    x = torch.randn(2, 3, 64, 64)
    y = model(x)
    assert y.shape == (2, 10)
    y.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_small_model_on_the_triton_path_matches_float64(device):
    """A whole SASA ResNet (attention stem, stride-2 stages, channels_last) through the Triton kernels
    (the interpreter without CUDA) against the same model in float64 on the reference backend:
    the logits and the gradient of every parameter, each element within the suite's bound of
    PyTorch's own fp32 error (the reference backend in fp32). In eval mode: in training mode batch
    norm over a batch of 2 (at 32 x 32, 2 to 8 values a channel in the last stages) amplifies
    rounding about 1000-fold, the kernels' and PyTorch's alike (RMS ratio 1.1-1.2), but differently
    element by element."""
    from helpers import assert_close_to_reference

    torch.manual_seed(0)
    model = small_sasa(stem="attention", backend="triton").to(device).to(memory_format=torch.channels_last).eval()
    fp32 = models.set_backend(copy.deepcopy(model), "reference")
    exact = copy.deepcopy(fp32).double()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)

    def run(net, inputs):
        logits = net(inputs)
        weights = torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype, device=logits.device)
        return logits, torch.autograd.grad((logits.flatten() * weights).sum(), list(net.parameters()))

    got, exact_results, theirs = (run(net, inputs) for net, inputs in (
        (model, x.float().to(device)), (exact, x.to(device)), (fp32, x.float().to(device))))
    names = ["logits", *(name for name, _ in exact.named_parameters())]
    assert sum("rel_rows" in n for n in names) == 4, names  # every attention layer's tables
    for name, g, e, r in zip(names, [got[0], *got[1]], [exact_results[0], *exact_results[1]],
                             [theirs[0], *theirs[1]]):
        assert_close_to_reference(g, e, r, torch.float32, name)


@pytest.mark.parametrize("stem", ["conv", "attention"])
def test_channels_last_matches_contiguous(stem):
    torch.manual_seed(0)
    model = small_sasa(stem=stem).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last)
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stem", ["conv", "attention"])
def test_state_dict_round_trip(stem):
    torch.manual_seed(0)
    model = small_sasa(stem=stem)
    model.train()
    model(torch.randn(4, 3, 32, 32))  # move the BN running stats off their init
    model.eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    torch.manual_seed(1)
    clone = small_sasa(stem=stem).eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)
    # Whole-module pickling too.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    whole = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        torch.testing.assert_close(whole(x), model(x), rtol=0, atol=0)


def test_conv_stem_keys_shared_between_baseline_and_sasa():
    """The conv baseline's weights for everything but the 3x3 convs load into the SASA model."""
    with torch.device("meta"):
        base, sasa = models.resnet26(), models.sasa_resnet26()
    base_keys, sasa_keys = set(base.state_dict()), set(sasa.state_dict())
    only_base = {k for k in base_keys - sasa_keys}
    assert only_base and all(k.endswith("conv2.weight") for k in only_base)


def test_bad_arguments():
    with pytest.raises(ValueError, match="stem"):
        models.sasa_resnet26(stem="patchify")
    with pytest.raises(ValueError, match="heads"):
        models.ResNet((1,), base_width=12, heads=8)
    with pytest.raises(ValueError, match="layers"):
        models.ResNet(())
    with pytest.raises(ValueError, match="backend"):
        models.sasa_resnet26(backend="cuda")


# ----------------------------------------------------------------------------------------------
# convert_to_sasa
# ----------------------------------------------------------------------------------------------

def test_convert_resnet50_equals_sasa_resnet50():
    with torch.device("meta"):
        converted = models.convert_to_sasa(models.resnet50(), kernel_size=7, heads=8)
        built = models.sasa_resnet50(stem="conv")
    assert n_params(converted) == n_params(built)
    assert {k: tuple(v.shape) for k, v in converted.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in built.state_dict().items()}
    assert isinstance(converted.conv1, nn.Conv2d) and converted.conv1.kernel_size == (7, 7)
    assert converted.layer2[0].conv2.stride == 2 and converted.layer2[1].conv2.stride == 1


class TVBottleneck(nn.Module):
    """torchvision.models.resnet.Bottleneck's shape, written out (no torchvision import)."""

    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                        nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.downsample(x))


class TVBasicBlock(nn.Module):
    def __init__(self, planes):
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class TVNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)  # a 3x3 stem: must stay
        self.bn1 = nn.BatchNorm2d(16)
        self.basic = TVBasicBlock(16)                                     # no 1x1 sibling: stays
        self.layer1 = nn.Sequential(TVBottleneck(16, 8), TVBottleneck(32, 8))
        self.layer2 = nn.Sequential(TVBottleneck(32, 16, stride=2))
        self.depthwise = nn.Sequential(nn.Conv2d(64, 64, 1), nn.Conv2d(64, 64, 3, padding=1, groups=64))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 5)

    def forward(self, x):
        x = self.basic(torch.relu(self.bn1(self.conv1(x))))
        x = self.depthwise(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def test_convert_torchvision_shaped_tree():
    torch.manual_seed(0)
    net = TVNet()
    x = torch.randn(2, 3, 16, 16)
    before = net(x).shape
    result = models.convert_to_sasa(net, kernel_size=5, heads=4, backend="reference")
    assert result is net  # in place
    converted = {n for n, m in net.named_modules() if isinstance(m, SelfAttention2d)}
    assert converted == {"layer1.0.conv2", "layer1.1.conv2", "layer2.0.conv2"}
    assert isinstance(net.conv1, nn.Conv2d) and isinstance(net.basic.conv1, nn.Conv2d)
    assert isinstance(net.depthwise[1], nn.Conv2d)  # groups != 1
    layer = net.layer2[0].conv2
    assert (layer.in_channels, layer.out_channels, layer.stride, layer.kernel_size, layer.heads) == (16, 16, 2, 5, 4)
    assert layer.backend == "reference"
    y = net(x)
    assert y.shape == before
    y.sum().backward()
    assert layer.rel_rows.grad is not None


def test_convert_predicate_dtype_and_errors():
    net = TVNet().double()
    models.convert_to_sasa(net, kernel_size=3, heads=2, backend="reference",
                           predicate=lambda name, conv, parent: name == "layer1.0.conv2")
    assert isinstance(net.layer1[0].conv2, SelfAttention2d)
    assert isinstance(net.layer1[1].conv2, nn.Conv2d)
    assert net.layer1[0].conv2.qkv.weight.dtype == torch.float64
    with pytest.raises(ValueError, match="heads"):
        models.convert_to_sasa(TVNet(), heads=3)


def test_set_backend():
    model = small_sasa(stem="attention", backend="auto")
    models.set_backend(model, "reference")
    backends = {m.backend for m in model.modules() if isinstance(m, (SelfAttention2d, nn.Module)) and
                isinstance(getattr(m, "backend", None), str)}
    assert backends == {"reference"}
    with pytest.raises(ValueError, match="backend"):
        models.set_backend(model, "gpu")


# ----------------------------------------------------------------------------------------------
# FLOPs
# ----------------------------------------------------------------------------------------------

def test_flops_paper_magnitudes():
    with torch.device("meta"):
        base, base26 = models.resnet50(), models.resnet26()
        sasa, sasa26, sasa38 = models.sasa_resnet50(stem="conv"), models.sasa_resnet26(), models.sasa_resnet38()
        full = models.sasa_resnet50(stem="attention")
    g = lambda m, **kw: models.count_flops(m, input_size=(1, 3, 224, 224), **kw) / 1e9
    assert abs(g(base) - 8.18) < 0.01             # paper 8.2 (torchvision ResNet-50: 4.09 GMACs)
    assert 6.6 < g(sasa) < 7.0                     # paper 7.0
    assert abs(g(sasa, relative="full") - 7.0) < 0.05
    assert g(sasa) < g(full) < 7.3                 # paper 7.2: the attention stem costs more
    assert abs(g(base26) - 4.7) < 0.1              # paper 4.7
    assert abs(g(sasa26, relative="full") - 4.5) < 0.05
    assert abs(g(sasa38, relative="full") - 5.7) < 0.05
    with pytest.raises(ValueError, match="relative"):
        models.count_flops(base, relative="half")


def test_flops_exact_for_single_layers():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1)
    assert models.count_flops(conv, (2, 8, 10, 10)) == 2 * 2 * 16 * 5 * 5 * 8 * 9
    layer = SelfAttention2d(8, 16, kernel_size=5, stride=2, heads=4, backend="triton")
    B, H, W, k = 2, 10, 10, 5
    projection = 2 * B * H * W * 8 * 48
    attention = 2 * B * H * W * 16 * (2 * k * k + k)
    assert models.count_flops(layer, (B, 8, H, W)) == projection + attention
    by_module = models.flops_by_module(layer, (B, 8, H, W))
    assert by_module == {"qkv": projection, "": attention}
    assert layer.backend == "triton"  # restored after the meta pass
    stem = AttentionStem(3, 16, block_size=4, heads=4, mixtures=4, pool=4)
    expected = 2 * 1 * 32 * 32 * (3 * 16 * 6 + 16 * (2 * 16 + 4))
    assert models.count_flops(stem, (1, 3, 32, 32)) == expected
    fc = nn.Linear(10, 3)
    assert models.count_flops(fc, (4, 10)) == 2 * 4 * 10 * 3


def test_flops_leave_model_untouched():
    model = small_sasa()
    model.train()
    model.layer1[0].bn1.eval()  # mixed modes survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    models.count_flops(model, (1, 3, 64, 64))
    assert model.training and model.layer1[0].bn2.training and not model.layer1[0].bn1.training
    after = model.state_dict()
    assert all(after[k].device.type == "cpu" and torch.equal(after[k], v) for k, v in before.items())
    assert not any(m._forward_hooks for m in model.modules())
