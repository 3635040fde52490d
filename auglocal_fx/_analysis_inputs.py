"""What the analysis reads: trained networks and data, and the helpers CKA and probes share.

A network is a ``LocalNet``, a plain ``nn.Module`` (converted at the data's image size) or a
path: a ``train`` output folder, its ``model.pt`` (rebuilt from the spec and options in
``last.pt`` beside it) or a LocalNet checkpoint; the files are read by
``auglocal_fx.checkpoints``. Data is a ``Dataset`` or ``DataLoader`` of ``(image, label)`` pairs,
or a tensor of images.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from .checkpoints import WEIGHTS, model_file, read, trained_config
from .data import build_datasets, dataset_geometry, subset
from .errors import AugLocalError, first_line
from .local import LocalNet, load, to_local
from .tables import abbreviate_names

__all__ = ["NetLike", "DataLike", "AnalysisData", "analysis_data", "load_trained", "as_local",
           "check_same_partition", "loader_of", "batches", "input_size_of", "Frozen", "block_names"]

NetLike = Union[LocalNet, nn.Module, str, os.PathLike]
DataLike = Union[Dataset, DataLoader, torch.Tensor]


@dataclass(frozen=True)
class AnalysisData:
    """The (un-augmented) sets ``analysis_data`` builds: ``train`` for probes, ``test``."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_size: Tuple[int, int, int]
    info: Dict[str, Any] = field(default_factory=dict)


def load_trained(path: Union[str, os.PathLike], map_location: Union[str, torch.device] = "cpu") -> LocalNet:
    """A trained network as a ``LocalNet`` (blocks and head hold the trained weights).

    Args:
        path: an ``auglocal-fx train`` output folder ``OUT``, its ``OUT/model.pt`` (the spec and
            options are read from ``OUT/last.pt``), or a ``LocalNet.save`` checkpoint.
        map_location: where to load the tensors.

    Raises:
        AugLocalError: a missing or corrupt file, a run trained from a model object (no spec to
            rebuild it from), or weights that do not fit the architecture.
    """
    file = model_file(path)
    config = trained_config(file)
    if config is None:  # a LocalNet checkpoint: spec and options are in the file
        return load(file, map_location=map_location)
    spec = config.get("model")
    if not isinstance(spec, str) or ":" not in spec:
        raise AugLocalError(f"{file} was trained from a model object ({spec}), not a spec: load "
                            "the weights into that model and pass it with to_local(model, input_size=...)")

    classes, size = dataset_geometry(config["dataset"], config.get("input_size"))
    # A BP run's local options were never used: the defaults only give it (unused) auxiliary nets.
    options = {} if config.get("method") == "bp" else {
        k: config[k] for k in ("d", "tau", "pyramid", "selection", "aux_head", "rule") if k in config}
    # Runs before model_kwargs existed have no such key: the builder's defaults.
    local = to_local(spec, input_size=size, num_classes=classes, model_kwargs=config.get("model_kwargs"),
                     **options)
    state = read(file, WEIGHTS, map_location)
    try:
        local.export().load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - any mismatch is the user's file
        raise AugLocalError(f"the weights in {file} do not fit {spec} "
                            f"({first_line(exc, limit=160)}); is it the model.pt of that run?") from None
    return local.to(map_location)


def as_local(net: NetLike, input_size: Optional[Sequence[int]] = None) -> LocalNet:
    if isinstance(net, LocalNet):
        return net
    if isinstance(net, (str, os.PathLike)):
        return load_trained(net)
    if isinstance(net, nn.Module):
        return to_local(net, input_size=input_size)
    raise AugLocalError(f"expected a LocalNet, an nn.Module or a checkpoint path, not {type(net).__name__}")


def check_same_partition(a: LocalNet, b: LocalNet) -> None:
    if len(a.blocks) != len(b.blocks):
        raise AugLocalError(f"the networks have {len(a.blocks)} and {len(b.blocks)} blocks; CKA per block "
                            "needs two trainings of the same architecture")
    for j, (sa, sb) in enumerate(zip(a.block_shapes, b.block_shapes)):
        if tuple(sa) != tuple(sb):
            raise AugLocalError(f"block {j} outputs {tuple(sa)} in one network and {tuple(sb)} in the other; "
                                "compare two trainings of the same architecture at the same input size")


def analysis_data(dataset: str, input_size: Sequence[int], data_dir: Optional[str] = None,
                  test_subset: Optional[int] = None, probe_train_subset: Optional[int] = None,
                  seed: int = 0) -> AnalysisData:
    """Training and test sets without augmentation, optionally seeded random subsets.

    Args:
        dataset: a name ``auglocal_fx.data.build_datasets`` accepts.
        input_size: ``(C, H, W)`` the networks were trained at (``LocalNet.input_size``).
        data_dir: the dataset folder, as for training.
        test_subset: keep this many test images (a seeded random subset, in a fixed order).
        probe_train_subset: keep this many training images for the probes.
        seed: seeds both subsets.
    """
    data = build_datasets(dataset, data_dir, tuple(input_size), augment=False)
    train = subset(data.train, probe_train_subset, seed)
    test = subset(data.test, test_subset, seed + 1)
    return AnalysisData(train, test, data.num_classes, data.input_size,
                        {"dataset": dataset, "train_examples": len(train), "test_examples": len(test),
                         "seed": seed})



def loader_of(data: DataLike, batch_size: int) -> DataLoader:
    """The batches of ``data``: a DataLoader as given (its order, sampler and transforms); a
    dataset or a tensor of images ``(N, C, H, W)`` in order, ``batch_size`` at a time."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        if data.dim() < 2:
            raise AugLocalError(f"a tensor of images must be (N, C, H, W), got shape {tuple(data.shape)}")
        data = TensorDataset(data, torch.zeros(len(data), dtype=torch.long))
    elif not isinstance(data, Dataset):
        raise AugLocalError(f"data must be a torch Dataset, a DataLoader or a tensor of images (N, C, H, W), "
                            f"got {type(data).__name__}")
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def batches(loader: DataLoader, device: torch.device, desc: str,
             progress: bool) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """``(images, labels)`` on ``device`` from each batch of ``loader``."""
    if progress:
        from tqdm.auto import tqdm

        loader = tqdm(loader, desc=desc, leave=False)
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) >= 2 and isinstance(batch[0], torch.Tensor)):
            raise AugLocalError(f"each batch must be (images, labels), got {type(batch).__name__}; pass a "
                                "Dataset or DataLoader of (image, label) pairs")
        yield batch[0].to(device), torch.as_tensor(batch[1]).to(device)


def input_size_of(loader: DataLoader) -> Optional[Tuple[int, ...]]:
    """``(C, H, W)`` of the first batch's images (``None`` for no data)."""
    first = next(batches(loader, torch.device("cpu"), "", False), None)
    return None if first is None else tuple(first[0].shape[1:])



class Frozen:
    """Eval mode and ``device`` for the body; the mode and device are restored afterwards."""

    def __init__(self, nets: Sequence[LocalNet], device: torch.device):
        self.nets = list({id(n): n for n in nets}.values())
        self.device = device

    def __enter__(self):
        self.state = [(n.training, next((p.device for p in n.parameters()), self.device)) for n in self.nets]
        for n in self.nets:
            n.to(self.device).eval()
        return self

    def __exit__(self, *exc):
        for n, (mode, device) in zip(self.nets, self.state):
            n.to(device).train(mode)


def block_names(local: LocalNet) -> List[str]:
    return [abbreviate_names(names) for names in local.block_names]
