"""InfoPro (Wang et al., 2021): cross-entropy plus reconstruction of the input, as the authors'
code builds it.

Classifier (``AuxNetwork(net_config='InfoPro')``): a ``3x3`` conv + BN + ReLU that, where the
block is finer than the network's last block, doubles the width with stride 2 (their 16->32 and
32->64 stages) and otherwise keeps both (64->64), global average pooling, Linear to 128, ReLU,
the classifier. Decoder (``Decoder_InfoPro``, ``'2c'``): bilinear upsampling to the image size,
``3x3`` conv to 12 + BN + ReLU, ``3x3`` conv to the image channels, sigmoid; binary cross-entropy
against the image before normalisation. Weights ``(reconstruction, cross-entropy)`` go linearly
from the first local module to the last, as the authors' ``run.sh`` sets them per network
(``reconstruction_schedule``).
"""

from __future__ import annotations

from typing import Tuple

from torch import nn

from ..planning import AuxPlan
from .base import LocalRule, RuleAux, RuleContext, initialise, interpolate_weights, to_map
from .registry import register_rule

__all__ = ["InfoProRule", "reconstruction_decoder", "reconstruction_schedule", "RECONSTRUCTION_SCHEDULES"]

Schedule = Tuple[Tuple[float, float], Tuple[float, float]]
# The authors' run.sh: (ixx, ixy) at the first and at the last local module, for each of their
# two networks, keyed by its number of local modules K.
RECONSTRUCTION_SCHEDULES = {
    16: ((5.0, 0.05), (0.2, 0.5)),  # ResNet-32
    55: ((5.0, 0.0), (0.5, 1.0)),   # ResNet-110
}
DECODER_WIDTH = 12
CLASSIFIER_HIDDEN = 128


def reconstruction_schedule(num_local: int) -> Schedule:
    """InfoPro's ``((ixx, ixy) first, (ixx, ixy) last)`` for a network of ``num_local`` modules.

    The authors tuned one schedule per network: ResNet-32 (16 local modules) and ResNet-110 (55,
    where the first modules, far from the output, get no cross-entropy and the last more). Any
    network gets the schedule of the one nearer in local modules (ties: the shallower), so
    ``K <= 35`` gets ResNet-32's and ``K >= 36`` ResNet-110's: the weights are a schedule over
    local modules, and ``K`` is the fact both networks are tuned by.
    """
    nearest = min(RECONSTRUCTION_SCHEDULES, key=lambda k: (abs(k - num_local), k))
    return RECONSTRUCTION_SCHEDULES[nearest]


def reconstruction_decoder(context: RuleContext, block: int) -> nn.Module:
    """InfoPro's two-conv decoder from block ``block``'s output back to the image."""
    partition = context.partition
    pre, (c, _, _) = to_map(partition.block_shapes[block], partition.output_layout(block))
    image_channels, height, width = context.input_size
    decoder = nn.Sequential(
        pre,
        nn.Upsample(size=(height, width), mode="bilinear", align_corners=True),
        nn.Conv2d(c, DECODER_WIDTH, 3, padding=1), nn.BatchNorm2d(DECODER_WIDTH), nn.ReLU(),
        nn.Conv2d(DECODER_WIDTH, image_channels, 3, padding=1), nn.Sigmoid(),
    )
    return initialise(decoder, context.init)


@register_rule
class InfoProRule(LocalRule):
    name = "infopro"
    label = "InfoPro"
    second_loss = True
    order = 3

    def build(self, plan: AuxPlan, context: RuleContext) -> nn.Module:
        partition = context.partition
        pre, (c, h, _) = to_map(partition.block_shapes[plan.block], partition.output_layout(plan.block))
        finer = h > partition.resolutions[-1]
        width, stride = (2 * c, 2) if finer else (c, 1)
        classifier = nn.Sequential(
            pre,
            nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
            nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(),
            nn.Linear(width, CLASSIFIER_HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(CLASSIFIER_HIDDEN, context.num_classes),
        )
        weights = interpolate_weights(*reconstruction_schedule(context.num_local), plan.block,
                                      context.num_local)
        return RuleAux(initialise(classifier, context.init), reconstruction_decoder(context, plan.block),
                       "reconstruction", weights)
