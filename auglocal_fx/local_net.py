"""``LocalNet``: the primary network cut into blocks, the auxiliary networks, and the step.

The primary blocks share their modules (and so their parameters) with the original model; the
auxiliary networks are new. ``LocalNet.train_step`` is the simultaneous scheme of docs/method.md
rule 6: each block's local loss is back-propagated, and its autograd graph freed, before the
next block runs, so a step holds the activations of one local module at a time. ``to_local``
and ``load`` (``auglocal_fx.local``) build one.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ._io import atomic_save
from .checkpoints import LOCALNET
from .errors import AugLocalError
from .following import Following, Freezing
from .graph_blocks import Boundary, as_tuple, detach
from .tying import Tying
from .options import ConversionOptions
from .partition import Partition
from .planning import AuxPlan
from .rules.base import LossFn, Normalization

__all__ = ["LocalNet", "CHECKPOINT_FORMAT", "step_groups"]

CHECKPOINT_FORMAT = LOCALNET.format
_CHECKPOINT_VERSION = LOCALNET.version


class LocalNet(nn.Module):
    """A network trained by AugLocal: primary blocks, head and auxiliary networks.

    Attributes:
        blocks: the ``L`` primary blocks; running them in order, then ``head``, is the original.
        head: global pooling and classifier.
        aux: one auxiliary network per block ``0 .. K-2``.
        plan: per auxiliary network, the block it serves, the blocks it copies and their strides.
        num_local: ``K``; blocks ``K-1 .. L-1`` and the head form the output module.
        block_names: module names each block covers.
        block_shapes: each block's output shape ``(C, H, W)`` at ``input_size`` (of the newest
            element where a boundary carries a tuple).
        output_shapes: the shapes of everything each block returns (several for a tuple).
        input_size: ``(C, H, W)`` the network was converted at.
        num_classes: width of the logits.
        conversion: the :class:`~auglocal_fx.ConversionOptions` it was built with (input size,
            classes and auxiliary head resolved).
        options: ``conversion`` as the checkpoint's dict (a copy; kept for older callers).
        spec: the model spec string it was made from, or ``None`` for a model object.
        normalization: the inputs' per-channel ``(mean, std)`` (``to_local(normalization=)``),
            or ``None`` where unknown.
    """

    def __init__(self, model: nn.Module, partition: Partition, aux: Sequence[nn.Module],
                 plan: Sequence[AuxPlan], options: Union[ConversionOptions, Dict[str, Any]],
                 spec: Optional[str] = None):
        super().__init__()
        self.blocks = nn.ModuleList(partition.blocks)
        self.head = partition.head
        self.aux = nn.ModuleList(aux)
        self.plan: List[AuxPlan] = list(plan)
        self.num_local = len(self.plan) + 1
        self.block_names = partition.block_names
        self.head_names = partition.head_names
        self.input_layouts = partition.input_layouts
        self.output_shapes = partition.output_shapes
        if not isinstance(options, ConversionOptions):
            options = ConversionOptions.from_dict(options)
        self.conversion = options
        self.input_size = tuple(options.input_size)
        self.num_classes = int(options.num_classes)
        self.spec = spec
        # Issue 24: copies that follow their sources, auxiliary layers that stop training.
        self.following = None if options.aux_follow is None else Following(
            self.aux, self.blocks, self.head, options.aux_follow, options.aux_follow_adapted)
        self.freezing = None if options.aux_freeze is None else Freezing(self.aux, options.aux_freeze)
        self.tying = Tying(self.aux, self.blocks, self.head) if options.aux_tie else None
        self._original = [model]  # a list keeps it out of the module tree and the state_dict
        self.train(model.training)

    @property
    def options(self) -> Dict[str, Any]:
        """The conversion options as a checkpoint stores them (a copy: change ``conversion``)."""
        return self.conversion.to_dict()

    @property
    def normalization(self) -> Optional[Normalization]:
        """The ``normalization`` given to :func:`to_local` (``None``: unknown)."""
        return self.conversion.normalization

    def forward(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Eval mode: the original model's logits. Train mode: ``(logits, aux_logits)``.

        In train mode the stop-gradients are in place, so summing the losses of all outputs
        and calling ``backward()`` once gives the local-learning gradients (but keeps every
        activation alive; :meth:`train_step` does not).
        """
        if not self.training:
            return self.primary_forward(x)
        aux_logits = []
        for j, block in enumerate(self.blocks):
            if 0 < j < self.num_local:
                x = detach(x)  # no gradient crosses a local module's boundary (every element)
            x = block(x)
            if j < self.num_local - 1:
                aux_logits.append(self.aux[j](x))
        return self.head(x), aux_logits

    def train_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        loss_fn: Optional[LossFn] = None,
        scaler: Optional["torch.amp.GradScaler"] = None,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """One simultaneous local-learning step; gradients accumulate, the caller steps.

        Args:
            x: input batch.
            y: targets.
            loss_fn: ``loss_fn(logits, y)``; default cross-entropy.
            scaler: a ``torch.amp.GradScaler`` to scale every backward (fp16 on CUDA).
            autocast_dtype: run forwards under ``torch.autocast`` with this dtype.

        Returns:
            A detached 1-D tensor of ``K`` losses: the ``K-1`` local losses, then the output loss.
        """
        return self.train_modules(x, y, loss_fn=loss_fn, scaler=scaler, autocast_dtype=autocast_dtype)[0]

    def train_modules(
        self,
        h: Boundary,
        y: torch.Tensor,
        start: int = 0,
        stop: Optional[int] = None,
        image: Optional[torch.Tensor] = None,
        loss_fn: Optional[LossFn] = None,
        scaler: Optional["torch.amp.GradScaler"] = None,
        autocast_dtype: Optional[torch.dtype] = None,
    ) -> Tuple[torch.Tensor, Boundary]:
        """:meth:`train_step` for local modules ``start .. stop-1`` only (a pipeline worker's share).

        Args are those of :meth:`module_losses` and :meth:`train_step`.

        Returns:
            The detached losses of the modules, and the detached output of the last one.
        """
        losses, out = [], h
        for loss, out in self.module_losses(h, y, start, stop, image=image, loss_fn=loss_fn,
                                            autocast_dtype=autocast_dtype):
            (scaler.scale(loss) if scaler is not None else loss).backward()
            losses.append(loss.detach())
        return torch.stack([v.float() for v in losses]), out

    def local_losses(self, x: torch.Tensor, y: torch.Tensor, loss_fn: Optional[LossFn] = None,
                     autocast_dtype: Optional[torch.dtype] = None) -> Iterator[torch.Tensor]:
        """The ``K`` local losses in order, each computed when the previous one is consumed.

        Each local module runs on the detached output of the one before, so the caller can
        back-propagate (and so free) a module's graph before the next runs, as
        :meth:`train_step` does, or measure each module on its own.
        """
        for loss, _ in self.module_losses(x, y, loss_fn=loss_fn, autocast_dtype=autocast_dtype):
            yield loss

    def module_losses(self, h: Boundary, y: torch.Tensor, start: int = 0, stop: Optional[int] = None,
                      image: Optional[torch.Tensor] = None, loss_fn: Optional[LossFn] = None,
                      autocast_dtype: Optional[torch.dtype] = None) -> Iterator[Tuple[torch.Tensor, Boundary]]:
        """Local modules ``start .. stop-1`` on ``h``: ``(loss, detached output)`` for each.

        Local module ``j < K-1`` is block ``j`` with auxiliary network ``j``; module ``K-1`` (the
        output module) is blocks ``K-1 .. L-1`` with the head, and its output is the last block's.
        A pipeline worker runs its own range on what the worker before it sent.

        Args:
            h: the input of module ``start`` (the image for ``start=0``).
            y: targets.
            start: the first local module of the range (default 0).
            stop: one past the last local module of the range (default ``K``: all).
            image: the input image, for rules whose loss reconstructs it (InfoPro); default ``h``
                when ``start == 0``.
            loss_fn: ``loss_fn(logits, y)``; default cross-entropy.
            autocast_dtype: run forwards under ``torch.autocast`` with this dtype.
        """
        stop = self.num_local if stop is None else stop
        if not 0 <= start < stop <= self.num_local:
            raise AugLocalError(f"local modules {start}..{stop - 1} are not in 0..{self.num_local - 1}")
        if image is None and start == 0:
            image = h
        loss_fn = loss_fn or F.cross_entropy
        if autocast_dtype is not None:
            device_type = as_tuple(h)[0].device.type
            autocast = lambda: torch.autocast(device_type=device_type, dtype=autocast_dtype)  # noqa: E731
        else:
            autocast = contextlib.nullcontext
        for j in range(start, min(stop, self.num_local - 1)):
            with autocast():
                out = self._recomputable(self.blocks[j], detach(h))
                loss = self._aux_loss(j, out, image, y, loss_fn)
            # Only the detached output survives: block j's graph goes with its loss.
            h = detach(out)
            del out
            yield loss, h
            del loss
        if stop == self.num_local:
            with autocast():
                out = self._recomputable(self.blocks[self.num_local - 1], detach(h))
                loss, out = self._output_loss(out, y, loss_fn)
            yield loss, detach(out)

    def after_optimizer_step(self, progress: Optional[float] = None, stepped: bool = True) -> None:
        """Call after each optimizer step: copies follow their sources (``aux_follow``) and,
        given the run's progress (``step / total_steps``), auxiliary layers freeze (``aux_freeze``).

        Args:
            progress: ``step / total_steps``; ``None`` leaves the freezing as it is.
            stepped: ``False`` when AMP's scaler skipped a step (inf/NaN gradients): the copies
                do not move then, as the weights they follow may not have.
        """
        if self.following is not None and stepped:
            self.following.step()
        if self.freezing is not None and progress is not None:
            self.freezing.set_progress(progress)

    @property
    def aux_checkpoint(self) -> bool:
        """Whether the primary blocks are recomputed in backward instead of kept (see :func:`to_local`)."""
        return self.conversion.aux_checkpoint

    @aux_checkpoint.setter
    def aux_checkpoint(self, value: bool) -> None:
        self.conversion = self.conversion.replace(aux_checkpoint=bool(value))

    def _aux_loss(self, j: int, out: Boundary, image: Optional[torch.Tensor], y: torch.Tensor,
                  loss_fn: LossFn) -> torch.Tensor:
        """Local loss ``j`` of block ``j``'s output."""
        aux = self.aux[j]
        if hasattr(aux, "local_loss"):  # a rule with a second loss (PredSim, InfoPro)
            return aux.local_loss(out, image, y, loss_fn, self.normalization)
        return loss_fn(aux(out), y)

    def _output_loss(self, out: Boundary, y: torch.Tensor, loss_fn: LossFn) -> Tuple[torch.Tensor, Boundary]:
        """The output loss of block ``K-1``'s output, and the last block's output.

        Blocks ``K .. L-1`` and the head serve block ``K-1`` as an auxiliary network serves the
        others; with ``aux_checkpoint`` each of those blocks is recomputed in backward on its own.
        """
        for block in self.blocks[self.num_local:]:
            out = self._recomputable(block, out)
        return loss_fn(self.head(out), y), out

    def _recomputable(self, block: nn.Module, h: Boundary) -> Boundary:
        """``block(h)``; with ``aux_checkpoint`` (training), recomputed in backward instead of kept.

        A local module's backward runs its last piece first (the auxiliary network, or the head),
        then each block before it: with every primary block recomputed on its own when its turn
        comes, backward holds one piece's activations at a time. Recomputing the auxiliary
        network too would lower no peak (its activations are used first, right after the
        forward) and would cost its forward again. Non-reentrant checkpoint replays dropout's RNG
        and autocast; the BatchNorm statistics the replay changes are put back.
        """
        if not self.aux_checkpoint or not torch.is_grad_enabled():
            return block(h)
        return checkpoint(block, *as_tuple(h), use_reentrant=False,
                          context_fn=lambda: (contextlib.nullcontext(), _KeepBuffers([block])))

    @property
    def needs_image(self) -> bool:
        """Whether a local loss takes the input image (InfoPro's reconstruction)."""
        return any(getattr(aux, "kind", None) == "reconstruction" for aux in self.aux)

    def block_outputs(self, x: torch.Tensor) -> Iterator[torch.Tensor]:
        """Each primary block's output in order, without stop-gradients."""
        for block in self.blocks:
            x = block(x)
            yield x

    def primary_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The primary network alone (blocks, then head) in the current mode: the original model."""
        h = x
        for h in self.block_outputs(x):
            pass
        return self.head(h)

    @property
    def block_shapes(self) -> List[Tuple[int, ...]]:
        return self.partition.block_shapes

    @property
    def partition(self) -> Partition:
        """The primary network's blocks and head with their shapes, as the synthesizer takes them."""
        return Partition(blocks=list(self.blocks), head=self.head, output_shapes=list(self.output_shapes),
                         block_names=list(self.block_names), head_names=list(self.head_names),
                         input_layouts=list(self.input_layouts))

    def block_parameters(self, j: int) -> Iterator[nn.Parameter]:
        """Parameters updated by local loss ``j``: block ``j`` and auxiliary network ``j``."""
        if not 0 <= j < self.num_local - 1:
            raise AugLocalError(f"block {j} has no auxiliary network (0 <= j < {self.num_local - 1})")
        yield from self.blocks[j].parameters()
        yield from self.aux[j].parameters()

    def output_module_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters updated by the output loss: blocks ``K-1 .. L-1`` and the head (each once)."""
        yield from nn.ModuleList([*self.blocks[self.num_local - 1:], self.head]).parameters()

    def module_parameters(self) -> List[List[nn.Parameter]]:
        """Each local module's parameters (``block_parameters``, then the output module's), in order.

        A parameter shared by several modules (``shared_parameters="sum"``) is in each of them:
        every user's loss adds to its gradient. :func:`step_groups` says when it is final.
        """
        last = self.num_local - 1
        return [list(self.block_parameters(j) if j < last else self.output_module_parameters())
                for j in range(self.num_local)]

    def shared_parameters(self) -> Dict[str, List[int]]:
        """``{name: local modules using it}`` of each parameter used by several local modules."""
        users: Dict[int, List[int]] = {}
        for j, params in enumerate(self.module_parameters()):
            for p in params:
                users.setdefault(id(p), []).append(j)
        names = {id(p): name for name, p in self.named_parameters()}  # the first name of each
        return {names[key]: modules for key, modules in users.items() if len(modules) > 1}

    def export(self) -> nn.Module:
        """The original model object, holding the trained primary weights.

        Its ``state_dict()`` loads with ``strict=True`` into a fresh copy of the original model.
        Nothing is changed, its train/eval mode included: its modules are this LocalNet's
        blocks, so set the mode you need (``model.eval()`` for inference).
        """
        return self._original[0]

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write spec, options and weights atomically (temp file + rename); see :func:`load`."""
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": _CHECKPOINT_VERSION,
            "spec": self.spec,
            "options": self.conversion.to_dict(),
            "state_dict": self.state_dict(),
        }
        atomic_save(payload, path)

    def extra_repr(self) -> str:
        return f"blocks={len(self.blocks)}, aux_nets={len(self.aux)}, {self.conversion.describe('repr')}"


def step_groups(modules: Sequence[Sequence[nn.Parameter]]) -> List[List[nn.Parameter]]:
    """Per local module, the parameters whose gradient is final after its loss's backward.

    A parameter belongs to the last module using it: a shared one gets the gradient of every
    user's loss, summed, so it is stepped (and clipped) once, with its last user. Unshared
    parameters stay with their module. Each parameter is in exactly one group.
    """
    last = {id(p): j for j, params in enumerate(modules) for p in params}
    groups: List[List[nn.Parameter]] = []
    for j, params in enumerate(modules):
        seen = set()
        groups.append([p for p in params if last[id(p)] == j and not (id(p) in seen or seen.add(id(p)))])
    return groups


class _KeepBuffers:
    """Context manager: the modules' buffers on exit are those they had on entry."""

    def __init__(self, modules: Sequence[nn.Module]):
        self.modules = list(modules)

    def __enter__(self) -> None:
        self.saved = [(b, b.detach().clone()) for m in self.modules for b in m.buffers()]

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for buffer, value in self.saved:
                buffer.copy_(value)
        self.saved = []
