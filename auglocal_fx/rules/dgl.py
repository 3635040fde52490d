"""DGL (Belilovsky et al., 2020): the MLP-SR auxiliary network, as the authors' code builds it.

Their ``AuxNetwork(net_config='DGL')`` for a block with ``C`` channels at ``H x H``: average
pooling to ``ceil(H/4)``, three ``1x1`` conv (``C`` wide, no bias) + BN + ReLU, average pooling
to ``m = min(ceil(H/4), 2)``, flatten, two ``C*m*m``-wide Linear (no bias) + BN1d + ReLU, then
the classifier. Cross-entropy only.
"""

from __future__ import annotations

import math

from torch import nn

from ..planning import AuxPlan
from .base import LocalRule, RuleContext, initialise, to_map
from .registry import register_rule

__all__ = ["DGLRule"]


@register_rule
class DGLRule(LocalRule):
    name = "dgl"
    label = "DGL"
    order = 1

    def build(self, plan: AuxPlan, context: RuleContext) -> nn.Module:
        partition = context.partition
        pre, (c, h, w) = to_map(partition.block_shapes[plan.block], partition.output_layout(plan.block))
        size = (math.ceil(h / 4), math.ceil(w / 4))
        mlp = (min(size[0], 2), min(size[1], 2))
        features = c * mlp[0] * mlp[1]
        layers = [pre, nn.AdaptiveAvgPool2d(size)]
        for _ in range(3):
            layers += [nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
        layers += [nn.AdaptiveAvgPool2d(mlp), nn.Flatten()]
        for _ in range(2):
            layers += [nn.Linear(features, features, bias=False), nn.BatchNorm1d(features), nn.ReLU()]
        layers.append(nn.Linear(features, context.num_classes))
        return initialise(nn.Sequential(*layers), context.init)
