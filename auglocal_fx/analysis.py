"""Representation analysis, the paper's section 4.3: per-block CKA and linear probes of two networks.

Two networks of the same architecture (say ``paper:resnet32`` trained by BP and by AugLocal)
are compared block by block at the partition's block outputs (``LocalNet.block_outputs``):
no forward hooks, no layer names. The estimator is in ``auglocal_fx.cka`` (``block_cka``,
``linear_cka``), the probes in ``auglocal_fx.probes`` (``linear_probe``), what they read
(trained networks, data sets) in ``auglocal_fx._analysis_inputs``; this module puts them
together for ``auglocal-fx analyze`` (``compare``) and re-exports them, so that ``from
auglocal_fx.analysis import block_cka, linear_probe, load_trained, analysis_data`` works.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._analysis_inputs import AnalysisData, NetLike, analysis_data, as_local, check_same_partition, load_trained
from .checkpoints import model_file, trained_config
from .cka import BlockCKA, block_cka, hsic_unbiased, linear_cka
from .data import dataset_geometry
from .errors import AugLocalError
from .local import LocalNet, load
from .options import ConversionOptions
from .probes import Probe, linear_probe
from .training import default_dataset

__all__ = ["BlockCKA", "Probe", "AnalysisData", "Comparison", "block_cka", "linear_cka", "hsic_unbiased",
           "linear_probe", "load_trained", "trained_config", "analysis_data", "compare", "describe"]


@dataclass(frozen=True)
class Comparison:
    """What ``compare`` returns: the CKA per block and, optionally, both networks' probes.

    Attributes:
        names: ``(A, B)`` as given (paths, or the LocalNets' specs).
        descriptions: ``(A, B)``: spec and training method of each.
        dataset: the dataset the features were computed on.
        input_size: ``(C, H, W)`` of the images.
        cka: ``BlockCKA`` of A with B.
        probe_a, probe_b: ``Probe`` of each network, or ``None`` without probes.
        seed: the seed of the data subsets.
    """

    names: Tuple[str, str]
    descriptions: Tuple[str, str]
    dataset: str
    input_size: Tuple[int, int, int]
    cka: BlockCKA
    probe_a: Optional[Probe]
    probe_b: Optional[Probe]
    seed: int

    def to_dict(self) -> Dict[str, Any]:
        """Plain JSON-ready values: one record per block, the average CKA, the protocol."""
        blocks = []
        for j, name in enumerate(self.cka.names):
            record = {"block": j, "modules": name, "shape": list(self.cka.shapes[j]), "cka": self.cka.values[j]}
            if self.probe_a is not None and self.probe_b is not None:
                record["probe_a"] = self.probe_a.accuracy[j]
                record["probe_b"] = self.probe_b.accuracy[j]
            blocks.append(record)
        out: Dict[str, Any] = {
            "a": self.names[0], "b": self.names[1], "a_model": self.descriptions[0],
            "b_model": self.descriptions[1], "dataset": self.dataset, "input_size": list(self.input_size),
            "mean_cka": self.cka.mean, "blocks": blocks,
            "cka_protocol": {"kernel": "linear", "features": "flattened block outputs",
                             "estimator": "minibatch unbiased HSIC (Nguyen et al. 2021)",
                             "examples": self.cka.examples, "batch_size": self.cka.batch_size,
                             "batches": self.cka.batches},
            "seed": self.seed,
        }
        if self.probe_a is not None:
            out["probe_protocol"] = {"features": "global-average-pooled block outputs, standardised",
                                     "classifier": "multinomial logistic regression, full-batch L-BFGS",
                                     "train_examples": self.probe_a.train_examples,
                                     "test_examples": self.probe_a.test_examples}
        return out


def describe(path: NetLike) -> str:
    """``"paper:resnet32, bp"`` / ``"paper:resnet32, auglocal d=2"`` for a checkpoint or LocalNet."""
    if isinstance(path, LocalNet):
        return f"{path.spec or 'model'}, {path.conversion.describe('brief')}"
    config = trained_config(path) if isinstance(path, (str, os.PathLike)) else None
    if config is None:
        local = load(model_file(path)) if isinstance(path, (str, os.PathLike)) else None
        return describe(local) if local is not None else type(path).__name__
    if config.get("method") == "bp":
        return f"{config['model']}, bp"
    options = ConversionOptions(d=config.get("d", 2), rule=config.get("rule", "auglocal"))
    return f"{config['model']}, {options.describe('brief')}"


def compare(model_a: NetLike, model_b: NetLike, dataset: Optional[str] = None, data_dir: Optional[str] = None,
            batch_size: int = 256, test_subset: Optional[int] = None, probe: bool = False,
            probe_train_subset: Optional[int] = None, device: Union[str, torch.device] = "cpu",
            seed: int = 0, progress: bool = True, input_size: Optional[Sequence[int]] = None) -> Comparison:
    """``block_cka`` of two trained networks and, with ``probe``, ``linear_probe`` of each.

    Args:
        model_a, model_b: ``train`` outputs (``OUT`` or ``OUT/model.pt``), LocalNet checkpoints,
            or ``LocalNet`` objects; the same partition at the same input size.
        dataset: default: the dataset A was trained on (read from ``OUT/last.pt``), else
            ``auglocal_fx.training.default_dataset``.
        data_dir: the dataset folder.
        batch_size: CKA minibatch size (and the forward batch of the probes).
        test_subset: use a seeded random subset of this many test images.
        probe: also train the linear probes.
        probe_train_subset: train the probes on this many training images (default: all).
        device: ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
        seed: seeds the subsets.
        progress: tqdm bars.
        input_size: ``(C, H, W)`` to convert plain ``nn.Module`` arguments at (default: the
            dataset's own size); trained networks keep the size they were trained at.

    Raises:
        AugLocalError: unreadable checkpoints, different architectures or input sizes, a
            missing dataset, bad options.
    """
    if dataset is None:
        config = trained_config(model_a) if isinstance(model_a, (str, os.PathLike)) else None
        if config is not None:
            dataset = config["dataset"]
        else:

            dataset = default_dataset()
    if input_size is None:

        input_size = dataset_geometry(dataset)[1]
    a, b = as_local(model_a, input_size), as_local(model_b, input_size)
    check_same_partition(a, b)
    if tuple(a.input_size) != tuple(b.input_size):
        raise AugLocalError(f"the networks were trained at {tuple(a.input_size)} and {tuple(b.input_size)}; "
                            "compare two networks trained at the same input size")
    data = analysis_data(dataset, a.input_size, data_dir, test_subset,
                         probe_train_subset if probe else 1, seed)
    cka = block_cka(a, b, data.test, batch_size=batch_size, device=device, progress=progress)
    probe_a = probe_b = None
    if probe:
        probe_a = linear_probe(a, data.train, data.test, batch_size, device, progress=progress)
        probe_b = linear_probe(b, data.train, data.test, batch_size, device, progress=progress)
    names = tuple(str(m) if isinstance(m, (str, os.PathLike)) else (getattr(m, "spec", None) or type(m).__name__)
                  for m in (model_a, model_b))
    return Comparison(names, (describe(model_a if not isinstance(model_a, nn.Module) else a),
                              describe(model_b if not isinstance(model_b, nn.Module) else b)),
                      dataset, tuple(data.input_size), cka, probe_a, probe_b, seed)
