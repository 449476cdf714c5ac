"""SASA ResNets (SPEC section 3): model builders, conversion of existing ResNets, FLOP counting.

    from sasa_triton import models
    net = models.sasa_resnet50(stem="attention")   # or stem="conv"; sasa_resnet26, sasa_resnet38
    base = models.resnet50()                       # the convolutional baseline (resnet26, resnet38)
    net = models.convert_to_sasa(base, kernel_size=7, heads=8)
    models.count_flops(net, input_size=(1, 3, 224, 224))
"""
from .convert import convert_to_sasa, set_backend
from .flops import count_flops, flops_by_module
from .resnet import (DEPTHS, STEMS, Bottleneck, ResNet, resnet26, resnet38, resnet50, sasa_resnet26,
                     sasa_resnet38, sasa_resnet50, spatial_layer)

__all__ = [
    "ResNet", "Bottleneck", "spatial_layer", "DEPTHS", "STEMS",
    "resnet26", "resnet38", "resnet50", "sasa_resnet26", "sasa_resnet38", "sasa_resnet50",
    "convert_to_sasa", "set_backend", "count_flops", "flops_by_module",
]
