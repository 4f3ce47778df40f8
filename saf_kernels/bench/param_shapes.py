"""Parameter shapes of torchvision's ResNet-18, ResNet-50 and ViT-B/16 (in module order), without
torchvision: the multi-tensor benchmarks need the lists, not the models. The totals match
torchvision's ``num_params`` (11,689,512 / 25,557,032 / 86,567,656; checked in the tests)."""

from __future__ import annotations


def _bn(c):
    return [(c,), (c,)]


def resnet(layers: list[int], bottleneck: bool, classes: int = 1000) -> list[tuple[int, ...]]:
    shapes = [(64, 3, 7, 7)] + _bn(64)
    inplanes = 64
    expansion = 4 if bottleneck else 1
    for i, blocks in enumerate(layers):
        planes = 64 * 2**i
        for b in range(blocks):
            if bottleneck:
                shapes += [(planes, inplanes, 1, 1)] + _bn(planes)
                shapes += [(planes, planes, 3, 3)] + _bn(planes)
                shapes += [(planes * 4, planes, 1, 1)] + _bn(planes * 4)
            else:
                shapes += [(planes, inplanes, 3, 3)] + _bn(planes)
                shapes += [(planes, planes, 3, 3)] + _bn(planes)
            if b == 0 and (i > 0 or inplanes != planes * expansion):
                shapes += [(planes * expansion, inplanes, 1, 1)] + _bn(planes * expansion)
            inplanes = planes * expansion
    shapes += [(classes, 512 * expansion), (classes,)]
    return shapes


def vit_b_16(classes: int = 1000) -> list[tuple[int, ...]]:
    d, mlp, patches = 768, 3072, 197
    shapes = [(1, 1, d), (d, 3, 16, 16), (d,), (1, patches, d)]
    for _ in range(12):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (mlp, d),
            (mlp,),
            (d, mlp),
            (d,),
        ]
    shapes += [(d,), (d,), (classes, d), (classes,)]
    return shapes


MODELS = {
    "resnet18": lambda: resnet([2, 2, 2, 2], bottleneck=False),
    "resnet50": lambda: resnet([3, 4, 6, 3], bottleneck=True),
    "vit_b_16": vit_b_16,
}

NUM_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "vit_b_16": 86_567_656}


def numel(shapes) -> int:
    total = 0
    for s in shapes:
        n = 1
        for d in s:
            n *= d
        total += n
    return total
