"""A toy local learning rule, all in this one file: importing it registers ``rule="toy"``.

What a plug-in rule needs: a ``LocalRule`` subclass with a name and a
label, an auxiliary network per locally trained block, and ``register_rule``.
"""

from torch import nn

from auglocal_fx.rules import LocalRule, register_rule
from auglocal_fx.rules.base import to_map


@register_rule
class ToyRule(LocalRule):
    """Every block but the last learns through global pooling and one linear classifier."""

    name = "toy"
    label = "Toy"

    def build(self, plan, context):
        partition = context.partition
        pre, (c, _, _) = to_map(partition.block_shapes[plan.block], partition.output_layout(plan.block))
        return nn.Sequential(pre, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, context.num_classes))
