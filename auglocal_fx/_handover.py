"""A converted network handed by the launching process to the processes it starts.

The launcher converts once and each pipeline worker rebuilds the network from bytes, instead
of converting it again (tracing, partition, synthesis, initial draws). Plain pickling would not
save much: unpickling a ``GraphModule`` traces its generated code again (two thirds of reading a
converted ResNet-110 back). Here each graph travels node by node and is rebuilt without
tracing; every module, parameter and buffer is pickled as usual, so tensors shared between the
primary blocks and the original model stay shared, and the weights are the launcher's bit for
bit.
"""

from __future__ import annotations

import importlib.util
import io
import pickle
import sys
from typing import Any, Dict

from torch import fx, nn
from torch.fx.node import map_aggregate

from .errors import AugLocalError

__all__ = ["pack_network", "unpack_network"]

# Model files given as ``path/file.py:factory`` are imported under a per-process name (see
# ``auglocal_fx.specs``); the receiver imports them under the sender's names before unpickling.
_USER_PREFIX = "_auglocal_user_"


class _Ref:
    """A node argument that is another node, by name (rebuilt into that node)."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return _Ref, (self.name,)


def _graph_parts(graph: fx.Graph) -> Dict[str, Any]:
    def ref(value):
        return _Ref(value.name) if isinstance(value, fx.Node) else value

    nodes = [(n.op, n.name, n.target, map_aggregate(n.args, ref), map_aggregate(n.kwargs, ref), n.type,
              dict(n.meta)) for n in graph.nodes]
    return {"nodes": nodes, "tracer_cls": graph._tracer_cls, "tracer_extras": graph._tracer_extras,
            "codegen": graph._codegen}


def _rebuild_graph(parts: Dict[str, Any]) -> fx.Graph:
    graph = fx.Graph(tracer_cls=parts["tracer_cls"], tracer_extras=parts["tracer_extras"])
    graph._codegen = parts["codegen"]
    values: Dict[str, fx.Node] = {}

    def node(value):
        return values[value.name] if isinstance(value, _Ref) else value

    for op, name, target, args, kwargs, type_expr, meta in parts["nodes"]:
        created = graph.create_node(op, target, map_aggregate(args, node), map_aggregate(kwargs, node),
                                    name, type_expr)
        created.meta.update(meta)
        values[name] = created
    return graph


def _rebuild_graph_module(class_name: str, state: Dict[str, Any], parts: Dict[str, Any]) -> fx.GraphModule:
    """A ``GraphModule`` with ``state`` (its modules, tensors and attributes) and the graph of ``parts``."""
    gm = fx.GraphModule.__new__(fx.GraphModule)  # its own subclass, as fx gives every instance
    gm.__dict__.update(state)
    gm.__class__.__name__ = class_name
    gm.graph = _rebuild_graph(parts)  # the setter generates the code: no tracing
    return gm


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj):
        if isinstance(obj, fx.GraphModule):
            state = {k: v for k, v in obj.__dict__.items() if k != "_graph"}
            return _rebuild_graph_module, (type(obj).__name__, state, _graph_parts(obj.graph))
        return NotImplemented


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, user_files: Dict[str, str]):
        super().__init__(file)
        self.user_files = user_files

    def find_class(self, module: str, name: str):
        if module not in sys.modules and module in self.user_files:
            spec = importlib.util.spec_from_file_location(module, self.user_files[module])
            loaded = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(loaded)
            sys.modules[module] = loaded
        return super().find_class(module, name)


def pack_network(net: nn.Module) -> bytes:
    """``net`` (a converted network) as bytes for :func:`unpack_network`."""
    buffer = io.BytesIO()
    user_files = {name: module.__file__ for name, module in list(sys.modules.items())
                  if name.startswith(_USER_PREFIX) and getattr(module, "__file__", None)}
    pickle.dump(user_files, buffer, protocol=pickle.HIGHEST_PROTOCOL)  # read first: the net needs them
    try:
        _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(net)
    except (pickle.PicklingError, AttributeError, TypeError) as err:
        raise AugLocalError(f"cannot hand the converted network to the pipeline workers ({err}); define the "
                            "model in an importable module or give a spec such as path/file.py:factory") from err
    return buffer.getvalue()


def unpack_network(data: bytes) -> nn.Module:
    """The network :func:`pack_network` packed: the same modules, graphs and tensors."""
    buffer = io.BytesIO(data)
    user_files = pickle.load(buffer)
    return _Unpickler(buffer, user_files).load()
