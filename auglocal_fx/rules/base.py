"""What every local learning rule provides, and the auxiliary module of rules with extra losses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..initialization import InitReference
from ..layouts import NCHW, ShapeAdapter, channels, grid_size
from ..partition import Partition
from ..planning import AuxPlan
from ..synthesis import CopyTemplates

__all__ = ["LocalRule", "RuleAux", "RuleContext", "interpolate_weights", "to_map",
           "initialise", "Normalization"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# The per-channel ``(mean, std)`` the images were normalised with (torchvision's ``Normalize``).
Normalization = Tuple[Sequence[float], Sequence[float]]


@dataclass
class RuleContext:
    """What a rule may use to build an auxiliary network.

    Attributes:
        partition: the primary network's blocks, head and shapes.
        num_classes: width of the logits.
        input_size: ``(C, H, W)`` of the images.
        num_local: ``K``, the number of local modules.
        init: initial-value statistics of the source model (``None``: PyTorch's defaults).
        aux_head: the ``aux_head`` option (AugLocal's head: copy, slim or auto).
        aux_init: the ``aux_init`` option (AugLocal's copies: ``"init"`` or ``"copy"``).
        notes: collects input adapters of AugLocal's copies (one warning per conversion).
        aux_resolution: the ``aux_resolution`` option (AugLocal's copies: ``"paper"`` or
            ``"source"``).
        templates: the conversion's adapted copies, shared by all its auxiliary networks
            (``None``: each network adapts its own copies).
    """

    partition: Partition
    num_classes: int
    input_size: Tuple[int, int, int]
    num_local: int
    init: Optional[InitReference] = None
    aux_head: str = "auto"
    notes: Optional[List[Tuple[str, str, str]]] = None
    aux_init: str = "init"
    aux_resolution: str = "paper"
    templates: Optional[CopyTemplates] = None


class LocalRule:
    """A local learning rule: which blocks learn locally, and with which auxiliary network.

    Register a subclass with ``register_rule``; the class
    attributes are what the conversion, the reports and the CLI read.

    Attributes:
        name: the value of ``to_local(..., rule=)``, ``--rule`` and ``--rules``.
        label: what reports call it (``"AugLocal"``, ``"DGL"``; a row adds `` d=D`` where
            ``uses_depth``).
        uses_depth: ``True`` where ``d``, ``tau``, ``pyramid`` and ``selection`` shape the
            auxiliary networks (AugLocal); the baselines train every block but the last locally.
        second_loss: ``True`` where the auxiliary network is a ``RuleAux`` with a loss
            beyond cross-entropy (its decoder is not in the FLOPs of Table 7).
        order: where the rule is listed (choices, error messages); ties keep registration order.
        takes_tuples: ``True`` where its auxiliary networks take a block boundary carrying a
            tuple of tensors (several streams); other rules refuse such a network.
    """

    name = ""
    label = ""
    uses_depth = False
    second_loss = False
    order = 100
    takes_tuples = False

    def plan(self, resolutions: Sequence[int], d: int, tau: float, pyramid: bool,
             selection: str) -> List[AuxPlan]:
        """One plan per locally trained block; the baselines: every block but the last."""
        return [AuxPlan(block=j, selected=(), strides=()) for j in range(len(resolutions) - 1)]

    def build(self, plan: AuxPlan, context: RuleContext) -> nn.Module:
        """The auxiliary network of block ``plan.block`` (logits from the block's output)."""
        raise NotImplementedError


def interpolate_weights(first: Tuple[float, float], last: Tuple[float, float], j: int,
                        num_local: int) -> Tuple[float, float]:
    """Loss weights of local module ``j``, linear from the first to the last local module.

    As the authors' code: ``ratio = j / (K - 2)`` (0 where ``K <= 2``).
    """
    ratio = j / (num_local - 2) if num_local > 2 else 0.0
    return tuple(a * (1 - ratio) + b * ratio for a, b in zip(first, last))  # type: ignore[return-value]


def to_map(shape: Sequence[int], layout: str) -> Tuple[nn.Module, Tuple[int, int, int]]:
    """A parameter-free module giving ``NCHW`` maps from features of ``shape`` and the map shape.

    Convolutional auxiliary networks (DGL, PredSim, InfoPro) take maps; token and channels-last
    features are laid out as their grid first (prefix tokens dropped).
    """

    _, h, w = grid_size(shape, layout)
    out = (channels(shape, layout), h, w)
    if layout == NCHW:
        return nn.Identity(), out
    return ShapeAdapter(shape, layout, out, NCHW), out


def initialise(module: nn.Module, init: Optional[InitReference]) -> nn.Module:
    """Draw ``module``'s convs and linears as the source model draws layers of their type
    (rule 10; the authors' code draws the baselines' convs as their ResNets' convs); norms keep
    1 / 0."""
    if init is not None:
        with torch.no_grad():
            for sub in module.modules():
                if isinstance(sub, (nn.Conv2d, nn.Linear)):
                    init.initialise_(sub, {})
    return module


class RuleAux(nn.Module):
    """An auxiliary network with a second local loss (PredSim's similarity, InfoPro's
    reconstruction).

    ``forward(h)`` gives the classifier's logits (what Table 7 counts and what the auxiliary
    accuracy uses); ``local_loss`` gives ``ixx * decoder loss + ixy * classification loss``.

    Args:
        classifier: block output -> logits.
        decoder: block output -> what the second loss compares.
        kind: ``"similarity"`` or ``"reconstruction"``.
        weights: ``(ixx, ixy)`` for this local module.
    """

    def __init__(self, classifier: nn.Module, decoder: nn.Module, kind: str,
                 weights: Tuple[float, float]):
        super().__init__()
        self.classifier = classifier
        self.decoder = decoder
        self.kind = kind
        self.weights = (float(weights[0]), float(weights[1]))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classifier(h)

    @property
    def reductions(self) -> Tuple[int, ...]:
        """The classifier's copies' reductions (see :class:`~auglocal_fx.synthesis.AuxNet`)."""
        return tuple(getattr(self.classifier, "reductions", ()))

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, weights(ixx, ixy)={self.weights}"

    def local_loss(self, h: torch.Tensor, image: torch.Tensor, target: torch.Tensor,
                   loss_fn: Optional[LossFn] = None,
                   normalization: Optional[Normalization] = None) -> torch.Tensor:
        """The local loss of this module on block output ``h`` for images ``image``.

        ``normalization``: the images' ``(mean, std)``, for the reconstruction target (see
        ``reconstruction_target``).
        """
        ixx, ixy = self.weights
        decoded = self.decoder(h)
        if self.kind == "similarity":
            second = similarity_loss(decoded, target, self.classifier_classes())
        else:
            second = reconstruction_loss(decoded, image, normalization)
        # A zero weight still runs the classifier, as the authors' code does: its parameters
        # then get a zero gradient (not none), so weight decay and momentum still act on them.
        return ixx * second + ixy * (loss_fn or F.cross_entropy)(self.classifier(h), target)

    def classifier_classes(self) -> int:
        return [m for m in self.classifier.modules() if isinstance(m, nn.Linear)][-1].out_features


def similarity_matrix(x: torch.Tensor) -> torch.Tensor:
    """PredSim's adjusted cosine similarity of the batch's examples (the authors' ``losses.py``).

    Maps with more than 3 channels and more than one row are summarised by each channel's
    standard deviation over positions.
    """
    if x.dim() == 4:
        if x.size(1) > 3 and x.size(2) > 1:
            x = x.view(x.size(0), x.size(1), -1).std(dim=2)
        else:
            x = x.view(x.size(0), -1)
    centred = x - x.mean(dim=1, keepdim=True)
    normed = centred / (1e-8 + centred.pow(2).sum(dim=1, keepdim=True).sqrt())
    return (normed @ normed.t()).clamp(-1, 1)


def similarity_loss(decoded: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """MSE between the similarity matrices of the decoded features and the label vectors.

    Class indices become one-hot vectors (the authors' loss); soft targets (mixup, cutmix: one
    row of class probabilities per example) are the label vectors as they are.
    """
    labels = F.one_hot(target, num_classes) if target.dim() == 1 else target
    return F.mse_loss(similarity_matrix(decoded), similarity_matrix(labels.to(decoded.dtype)))


def reconstruction_target(image: torch.Tensor,
                          normalization: Optional[Normalization] = None) -> torch.Tensor:
    """What InfoPro's decoder reconstructs: the image in ``[0, 1]``, before normalisation.

    Args:
        image: the normalised images ``(N, C, H, W)``.
        normalization: the per-channel ``(mean, std)`` they were normalised with. Given (the
            trainer gives its dataset's), the normalisation is undone, ``image * std + mean``:
            the authors' ``_image_restore``. ``None`` (images of unknown statistics): each image
            is rescaled to ``[0, 1]`` by its own minimum and maximum, which is the same up to
            how much of ``[0, 1]`` the image spans where the channels share one scale.
    """
    image = image.detach()
    if normalization is not None:
        mean, std = (torch.tensor(v, dtype=image.dtype, device=image.device).view(1, -1, 1, 1)
                     for v in normalization)
        return image * std + mean
    flat = image.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (image.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (image.dim() - 1)))
    return (image - low) / (high - low).clamp_min(1e-8)


def reconstruction_loss(decoded: torch.Tensor, image: torch.Tensor,
                        normalization: Optional[Normalization] = None) -> torch.Tensor:
    """InfoPro's binary cross-entropy between the reconstruction and ``reconstruction_target``."""
    return F.binary_cross_entropy(decoded.float(), reconstruction_target(image, normalization).float())
