"""AugLocal (docs/method.md, rules 2-5): copies of uniformly sampled later blocks; and AugLocal
with InfoPro's reconstruction loss added (the paper's appendix A.9)."""

from __future__ import annotations

from typing import List, Sequence

from torch import nn

from ..planning import AuxPlan, plan_aux_nets
from ..synthesis import synthesize_aux_net
from .base import LocalRule, RuleAux, RuleContext, interpolate_weights
from .infopro import reconstruction_decoder, reconstruction_schedule
from .registry import register_rule

__all__ = ["AugLocalRule", "AugLocalInfoProRule"]


@register_rule
class AugLocalRule(LocalRule):
    """Each auxiliary network is a fresh copy of ``n_j`` uniformly sampled later blocks and the
    head (pyramidal depth, stride and channel adaptation)."""

    name = "auglocal"
    label = "AugLocal"
    uses_depth = True
    order = 0
    takes_tuples = True

    def plan(self, resolutions: Sequence[int], d: int, tau: float, pyramid: bool,
             selection: str) -> List[AuxPlan]:
        return plan_aux_nets(resolutions, d, tau, pyramid, selection)

    def build(self, plan: AuxPlan, context: RuleContext) -> nn.Module:
        return synthesize_aux_net(context.partition, plan, context.init, context.notes,
                                  context.aux_head, context.aux_init, context.aux_resolution,
                                  context.templates)


@register_rule
class AugLocalInfoProRule(AugLocalRule):
    """AugLocal's auxiliary network and cross-entropy unchanged, plus InfoPro's reconstruction
    decoder and loss on every locally trained block (appendix A.9).

    Loss weights: cross-entropy 1 everywhere (AugLocal's); reconstruction as InfoPro's ``ixx``
    for the same number of local modules (``reconstruction_schedule``:
    5 at the first local module to 0.2 (ResNet-32's) or 0.5 (ResNet-110's) at the last).
    """

    name = "auglocal+infopro"
    label = "AugLocal+InfoPro"
    second_loss = True
    order = 4
    takes_tuples = False  # the reconstruction decoder reads one tensor

    def build(self, plan: AuxPlan, context: RuleContext) -> nn.Module:
        classifier = super().build(plan, context)
        ixx, _ = interpolate_weights(*reconstruction_schedule(context.num_local), plan.block,
                                     context.num_local)
        decoder = reconstruction_decoder(context, plan.block)
        return RuleAux(classifier, decoder, "reconstruction", (ixx, 1.0))
