"""Graph helpers shared by the synthesis modules: shapes and activation paths of a copy's nodes."""

from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import fx, nn

from ..tracing import SHAPE_KEY


def _replace_module(gm: fx.GraphModule, target: str, new: nn.Module) -> None:
    parent_name, _, name = target.rpartition(".")
    parent = gm.get_submodule(parent_name) if parent_name else gm
    setattr(parent, name, new)


def _resolution(shape: Optional[torch.Size]) -> Optional[int]:
    return int(shape[2]) if shape is not None and len(shape) >= 4 else None


def _tensor_inputs(node: fx.Node) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if a.meta.get(SHAPE_KEY) is not None
            and a.op != "get_attr"]


def _activation_inputs(node: fx.Node, dependent: set) -> List[fx.Node]:
    return [a for a in node.all_input_nodes if a in dependent]


def _dependent(graph: fx.Graph) -> set:
    deps = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in deps for a in node.all_input_nodes):
            deps.add(node)
    return deps


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
