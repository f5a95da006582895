"""The encoder-shape screen of fast_recipe.md (a record, not library code): ``SHAPE`` picks a
variant of small_cnn that replaces ``barlow.backbones.SmallCNN`` for one ``barlow`` command.

    SHAPE=pool3 PYTHONPATH=src python bench/results/fast_recipe/shape_screen.py pretrain \
        fashion-mnist-fast --out runs/shape/pool3 --set data.holdout=10000 \
        --set train.epochs=5 --set train.seed=0

(run on the recipe before it took ``feature_grid = 3``; ``SHAPE=base`` is that recipe). pool2 and
pool3 are layer for layer ``model.feature_grid = 2 | 3``, which the library now has; feat1024 (a
1×1 conv to 1024 channels before the pooling) and deep34 (a residual 3×3 conv after blocks 3 and
4) were not adopted.
"""

import os
import sys

from torch import nn

import barlow.backbones as bb

SHAPE = os.environ.get("SHAPE", "base")


def cbr(ci, co, k=3, s=1):
    conv = nn.Conv2d(ci, co, k, stride=s, padding=k // 2, bias=False)
    return [conv, nn.BatchNorm2d(co), nn.ReLU(inplace=True)]


class Res(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        nn.init.zeros_(self.body[1].weight)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(x + self.body(x))


class Variant(nn.Module):
    def __init__(self, *, in_channels=1, width=32):
        super().__init__()
        w = width
        layers = [*cbr(in_channels, w), *cbr(w, 2 * w, s=2), *cbr(2 * w, 4 * w, s=2)]
        if SHAPE in ("deep34", "deep3"):
            layers.append(Res(4 * w))
        last = 16 * w if SHAPE == "wide4" else 8 * w
        layers += cbr(4 * w, last, s=2)
        if SHAPE == "deep34":
            layers.append(Res(last))
        if SHAPE == "feat1024":
            layers += cbr(last, 1024, k=1)
            last = 1024
        if SHAPE in ("pool2", "pool3"):
            g = int(SHAPE[-1])
            layers += [nn.AdaptiveAvgPool2d(g), nn.Flatten()]
            last *= g * g
        else:
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.num_features = last

    def forward(self, x):
        return self.features(x)


if SHAPE != "base":
    bb.SmallCNN = Variant
from barlow.cli import main  # noqa: E402  (after the swap)

sys.exit(main(sys.argv[1:]))
