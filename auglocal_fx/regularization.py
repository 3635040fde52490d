"""The regularisation users of timm models train with: mixup / cutmix, label smoothing, weight EMA.

With mixup or cutmix (``timm.data.Mixup``) the targets are soft (one row of class
probabilities per image, label smoothing folded in) and every loss takes them: each auxiliary
network's cross-entropy, the rules' classification terms, PredSim's similarity target (the
similarity of the soft label vectors instead of the one-hot ones) and the output loss.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from torch import nn

if TYPE_CHECKING:  # imported where used: `auglocal-fx convert` needs none of them
    from timm.data import Mixup
    from timm.utils import ModelEmaV3

__all__ = ["uses_mixup", "build_mixup", "build_loss", "build_ema"]


def uses_mixup(cfg: Any) -> bool:
    return cfg.mixup > 0 or cfg.cutmix > 0


def build_mixup(cfg: Any, num_classes: int) -> Optional[Mixup]:
    """timm's batch mixer for ``cfg`` (``None`` without mixup and cutmix)."""
    if not uses_mixup(cfg):
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                 switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing, num_classes=num_classes)


def build_loss(cfg: Any) -> nn.Module:
    """Every local loss's criterion: soft-target cross-entropy with mixup (whose targets already
    carry the smoothing), else cross-entropy with ``label_smoothing``."""
    if uses_mixup(cfg):
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)


def build_ema(cfg: Any, primary: nn.Module) -> Optional[ModelEmaV3]:
    """An EMA copy of the primary network: after each update ``ema = d * ema + (1 - d) * w`` for
    parameters and float buffers alike, ``d = model_ema_decay`` from the first update (no warmup)."""
    if not cfg.model_ema:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(primary, decay=cfg.model_ema_decay)
