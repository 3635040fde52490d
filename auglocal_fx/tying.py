"""Beyond AugLocal (issue 24): auxiliary copies tied to their source blocks (``aux_tie``).

AugLocal's auxiliary network of block ``j`` holds copies of later blocks, each with its own
weights, gradients and optimizer state; for a transformer, whose blocks are large, those copies
cost more memory than the activations local learning saves (issue 22). Tied copies store no
kernel of their own: every multi-dimensional parameter of a block or head copy (convolution and
linear kernels, embeddings) that has a source parameter of the same shape is removed from the
copy, and at each forward the copy reads its source's current tensor, detached. No gradient
reaches the source through the copy (the local loss trains block ``j`` and its auxiliary
network only, as before), and the copy never holds a stale value: it sees the source as the
source's own module trains it. The copy's one-dimensional parameters (biases, norm scales and
shifts, layer scales) stay its own and are trained by the local loss, as MAN's learnable bias
is (Su et al., ECCV 2024); so do the layers the adaptation added (``auglocal_*``) or re-fitted
to another shape, slim heads, and buffers (BatchNorm statistics).

Why the detached tensor is safe with the trainer's update order: a copy's source is a later
block (or block ``j`` itself, with repetitive selection) or the head, and each local module is
stepped only after its own loss is back-propagated, so within a training step every source is
stepped after the backward of each auxiliary network that read it. ``detach()`` shares the
source's version counter, so an order that broke this would fail in backward ("modified by an
inplace operation") instead of computing gradients with other weights than the forward used.
With ``aux_checkpoint`` the recomputed forward reads the source again, unchanged by then.

The tensor is looked up by module and name at every forward (and let go after it), so moving
the network (``.to()``, ``.half()``), loading weights into the source, or copying the network
(``copy.deepcopy``) needs nothing more; a checkpoint holds the tied kernels once, as the
source's, and ``load`` ties them again because the option is saved with the network.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Set, Tuple

import torch
from torch import fx, nn

from .following import copied_parameters

__all__ = ["Tying"]

_Entry = Tuple[str, nn.Module, str]  # the copy's parameter name; the source's owner and name


class _TiedModule:
    """The tied tensors of one copied layer (a convolution, a linear layer, an embedding): set
    before its forward, dropped after it. The hooks sit on that layer, not on the traced graph
    around it, because a plain module keeps its hooks through ``copy.deepcopy`` and pickling and
    a ``GraphModule`` does not."""

    def __init__(self) -> None:
        self.entries: List[_Entry] = []

    def bind(self, module: nn.Module, args: Tuple[object, ...]) -> None:
        tracing = torch.jit.is_tracing()
        for name, source, source_name in self.entries:
            value = getattr(source, source_name)
            # detach: no gradient reaches the source, and the saved tensor keeps the source's
            # version counter, so autograd refuses a source changed in place before backward.
            # Under torch.jit.trace (fvcore's FLOP count) the source is no parameter of the traced
            # copy: it can only enter as a constant, and a constant must not record ``detach``.
            module.__dict__[name] = value.data if tracing else value.detach()

    def release(self, module: nn.Module, args: Tuple[object, ...], output: object) -> None:
        # Nothing outlives the forward: after .to() no alias holds the old storage alive.
        for name, _, _ in self.entries:
            module.__dict__.pop(name, None)


def _split(root: nn.Module, name: str) -> Tuple[str, nn.Module, str]:
    owner, _, attr = name.rpartition(".")
    return owner, (root.get_submodule(owner) if owner else root), attr


def _called_layers(layer: fx.GraphModule) -> Tuple[Set[str], Set[str]]:
    """The modules ``layer``'s graph calls, and the attributes it reads directly."""
    called = {str(n.target) for n in layer.graph.nodes if n.op == "call_module"}
    read = {str(n.target) for n in layer.graph.nodes if n.op == "get_attr"}
    return called, read


class Tying:
    """Removes the tied parameters from AugLocal's copies and reads their sources at each forward.

    Tied are the multi-dimensional parameters of layers the copy's graph calls (convolutions,
    linear layers, embeddings) whose source has the same shape; a tensor the graph reads itself
    (a position table, a class token) keeps its own weights, since a traced graph re-reads it
    whenever it is copied or pickled. Not a module: it has no state of its own (the option is
    saved with the network), so the module tree and ``state_dict`` hold only what is trained.

    Args:
        aux: the auxiliary networks.
        blocks: the primary blocks.
        head: the primary head.
    """

    def __init__(self, aux: Sequence[nn.Module], blocks: Sequence[nn.Module], head: nn.Module):
        modules: Dict[int, _TiedModule] = {}
        graphs: Dict[int, Tuple[Set[str], Set[str]]] = {}
        self.tied_bytes = 0
        self._count = 0
        for layer, name, param, graph, source in list(copied_parameters(aux, blocks, head)):
            called, read = graphs.setdefault(id(layer), _called_layers(layer))
            owner_name, owner, attr = _split(layer, name)
            if param.dim() < 2 or param.shape != source.shape or owner_name not in called or name in read:
                continue  # 1-D parameters stay the copy's own; re-fitted shapes keep their weights
            tied = modules.get(id(owner))
            if tied is None:
                tied = modules[id(owner)] = _TiedModule()
                owner.register_forward_pre_hook(tied.bind)
                owner.register_forward_hook(tied.release)
            del owner._parameters[attr]
            tied.entries.append((attr, *_split(graph, name)[1:]))
            self.tied_bytes += param.numel() * param.element_size()
            self._count += 1
        self._modules = list(modules.values())

    def __len__(self) -> int:
        """The number of copy parameters that read their source."""
        return self._count

    def __repr__(self) -> str:
        return f"Tying(tied={len(self)}, modules={len(self._modules)}, bytes_not_stored={self.tied_bytes})"
