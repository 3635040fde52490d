"""PredSim (Nøkland & Eidnes, 2019): prediction loss plus similarity matching, as the authors'
code builds it.

Classifier (``AuxNetwork(net_config='PredSim')``): average pooling with the smallest power-of-two
kernels that bring ``C*h*w`` to at most 512 (their ``get_pool_layer`` with ``hidden_dim=512``),
flatten, linear classifier. Similarity decoder (``Decoder_PredSim``): one ``3x3`` conv, ``C``
wide, no bias; its loss is the MSE between the batch's similarity matrices of the decoded
features and of the one-hot labels (``SimLoss``). Weights (``run.sh``): 0.99 similarity,
0.01 cross-entropy, at every local module.
"""

from __future__ import annotations

import math
from typing import Tuple

from torch import nn

from ..planning import AuxPlan
from .base import LocalRule, RuleAux, RuleContext, initialise, to_map
from .registry import register_rule

__all__ = ["PredSimRule", "pool_to_features"]

PREDSIM_HIDDEN = 512
PREDSIM_WEIGHTS = (0.99, 0.01)  # (similarity, cross-entropy)


def pool_to_features(channels: int, h: int, w: int, target: int) -> Tuple[nn.Module, int]:
    """The authors' ``get_pool_layer``: double the pooling kernel (rows, then columns) until the
    flattened size is at most ``target``; returns the pooling and the flattened size."""
    kh = kw = 1
    out_h, out_w = h, w
    size = channels * out_h * out_w
    while size > target and kh < h:
        kh *= 2
        out_h = math.ceil(h / kh)
        size = channels * out_h * out_w
        if size > target:
            kw *= 2
            out_w = math.ceil(w / kw)
            size = channels * out_h * out_w
    if kh == 1 and kw == 1:
        return nn.Identity(), size
    pad = ((kh * (out_h - h // kh)) // 2, (kw * (out_w - w // kw)) // 2)
    return nn.AvgPool2d((kh, kw), padding=pad), size


@register_rule
class PredSimRule(LocalRule):
    name = "predsim"
    label = "PredSim"
    second_loss = True
    order = 2

    def build(self, plan: AuxPlan, context: RuleContext) -> nn.Module:
        partition = context.partition
        shape, layout = partition.block_shapes[plan.block], partition.output_layout(plan.block)
        pre, (c, h, w) = to_map(shape, layout)
        pool, features = pool_to_features(c, h, w, PREDSIM_HIDDEN)
        classifier = nn.Sequential(pre, pool, nn.Flatten(), nn.Linear(features, context.num_classes))
        decoder = nn.Sequential(to_map(shape, layout)[0], nn.Conv2d(c, c, 3, padding=1, bias=False))
        return RuleAux(initialise(classifier, context.init), initialise(decoder, context.init),
                       "similarity", PREDSIM_WEIGHTS)
