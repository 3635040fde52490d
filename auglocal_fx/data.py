"""Datasets for training: the paper's benchmarks, offline datasets and a synthetic one.

Every dataset is read from disk (or built in memory); nothing is ever downloaded. Names:

* ``cifar10``, ``svhn``, ``stl10``: the torchvision classes, read from ``data_dir``
  (``download=False`` always; a missing dataset raises ``AugLocalError``).
* ``fashion-mnist``: the idx files (``train-images-idx3-ubyte[.gz]`` ...) read directly from
  ``data_dir`` (default ``/usr/share/datasets/fashion-mnist``, which the Debian package
  ``dataset-fashion-mnist`` provides) or from torchvision's ``FashionMNIST/raw`` layout;
  zero-padded from 28x28 to 32x32 and repeated to 3 channels so the paper's CIFAR nets apply.
* ``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, no files needed),
  resized to 32x32 RGB, with a fixed stratified 80/20 train/test split.
* ``imagefolder:PATH``: ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` (or ``PATH/test``).
* ``synthetic``: random images with a weak per-class signal, for smoke tests.

Training augmentation follows the authors' code (their ``train.py``), per dataset:

* CIFAR-10: pad 4 pixels by *reflection*, random 32x32 crop, random horizontal flip;
* SVHN: zero-pad 2, random crop, *no* flip (digits are not mirror-symmetric);
* STL-10: zero-pad 4, random 96x96 crop, random horizontal flip;
* Fashion-MNIST (not in the paper): zero-pad 4 (the background is 0), random crop, flip;
* digits and synthetic: zero-pad 4, random crop, no flip.

Padding scales with the image when ``input_size`` resizes it. Test images are only
normalised. ImageNet-style folders use random-resized crops and flips.
"""

from __future__ import annotations

import gzip
import os
import struct
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset
from torchvision.transforms import v2

from .errors import AugLocalError

__all__ = ["DATASETS", "DEFAULT_FASHION_MNIST_DIR", "Datasets", "build_datasets", "dataset_geometry",
           "dataset_normalization", "train_augmentation", "subset"]

DATASETS = ("cifar10", "svhn", "stl10", "fashion-mnist", "digits", "imagefolder:PATH", "synthetic")
DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_MEAN_STD = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "fashion-mnist": ((0.2860,) * 3, (0.3530,) * 3),
    "digits": ((0.2,) * 3, (0.35,) * 3),
    "imagefolder": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "synthetic": ((0.5,) * 3, (0.25,) * 3),
}
_NATIVE_SIZE = {"cifar10": 32, "svhn": 32, "stl10": 96, "fashion-mnist": 32, "digits": 32,
                "imagefolder": 224, "synthetic": 32}
_NUM_CLASSES = {"cifar10": 10, "svhn": 10, "stl10": 10, "fashion-mnist": 10, "digits": 10,
                "synthetic": 10}

class _Augment(NamedTuple):
    padding: int  # at the dataset's native size
    padding_mode: str
    flip: bool


_AUGMENT = {
    "cifar10": _Augment(4, "reflect", True),
    "svhn": _Augment(2, "constant", False),
    "stl10": _Augment(4, "constant", True),
    "fashion-mnist": _Augment(4, "constant", True),
    "digits": _Augment(4, "constant", False),
    "synthetic": _Augment(4, "constant", False),
}


class Datasets(NamedTuple):
    """What ``build_datasets`` returns (unpacks as a 4-tuple)."""

    train: Dataset
    test: Dataset
    num_classes: int
    input_size: Tuple[int, int, int]


class _TensorImages(Dataset):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)`` with integer labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable,
                 channels: int = 3):
        self.images = images
        self.labels = labels
        self.transform = transform
        self.channels = channels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if image.shape[0] != self.channels:
            image = image.expand(self.channels, -1, -1)
        return self.transform(image), int(self.labels[index])


def build_datasets(name: str, data_dir: Optional[str] = None,
                   input_size: Union[None, int, Sequence[int]] = None,
                   augment: bool = True) -> Datasets:
    """Build the train and test datasets named ``name``.

    Args:
        name: one of ``cifar10``, ``svhn``, ``stl10``, ``fashion-mnist``, ``digits``,
            ``imagefolder:PATH`` or ``synthetic``.
        data_dir: where the dataset lives (required for ``cifar10``, ``svhn`` and ``stl10``;
            ``fashion-mnist`` defaults to ``/usr/share/datasets/fashion-mnist``; ignored by
            ``digits``, ``synthetic`` and ``imagefolder:PATH``).
        input_size: side length (or ``(C, H, W)``) images are resized to; defaults to the
            dataset's native size (32, or 96 for STL-10, 224 for image folders).
        augment: apply the paper's training augmentation to the training set.

    Returns:
        ``Datasets(train, test, num_classes, input_size)``; items are
        ``(float tensor (3, H, W), int label)``.

    Raises:
        AugLocalError: for an unknown name or a dataset that is not on disk.
    """
    key = _dataset_key(name)
    side = _side(input_size, _NATIVE_SIZE[key])
    native = _NATIVE_SIZE[key]
    if key == "imagefolder":
        return _imagefolder(name[len("imagefolder:"):], side, augment)
    train_tf = _transform(key, side, native, augment)
    test_tf = _transform(key, side, native, False)
    if key in ("cifar10", "svhn", "stl10"):
        train, test = _torchvision(key, data_dir, train_tf, test_tf)
    elif key == "fashion-mnist":
        train, test = _fashion_mnist(data_dir or DEFAULT_FASHION_MNIST_DIR, train_tf, test_tf)
    elif key == "digits":
        train, test = _digits(train_tf, test_tf)
    else:
        train, test = _synthetic(native, train_tf, test_tf)
    return Datasets(train, test, _NUM_CLASSES[key], (3, side, side))


def dataset_geometry(name: str, input_size: Union[None, int, Sequence[int]] = None
                     ) -> Tuple[int, Tuple[int, int, int]]:
    """``(num_classes, (3, H, W))`` that ``build_datasets`` gives, without reading images.

    ``imagefolder:PATH`` counts the class folders of ``PATH/train``.

    Raises:
        AugLocalError: for an unknown name, a bad size, or an image folder without ``train/``.
    """
    key = _dataset_key(name)
    side = _side(input_size, _NATIVE_SIZE[key])
    if key != "imagefolder":
        return _NUM_CLASSES[key], (3, side, side)
    train = os.path.join(name[len("imagefolder:"):], "train")
    if not os.path.isdir(train):
        raise AugLocalError(f"{name} needs {train}/<class>/*; create it or pass another path")
    return sum(os.path.isdir(os.path.join(train, c)) for c in os.listdir(train)), (3, side, side)


def subset(dataset: Dataset, n: Optional[int], seed: int) -> Dataset:
    """A seeded random subset of ``n`` examples, in the permutation's order (all for ``n=None``)."""
    if n is None or n >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(seed)
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:n].tolist())


def dataset_normalization(name: str) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
    """The per-channel ``(mean, std)`` ``build_datasets`` normalises ``name``'s images with."""
    return _MEAN_STD[_dataset_key(name)]


def _dataset_key(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise AugLocalError(f"dataset must be a name, got {name!r}; choose from {', '.join(DATASETS)}")
    key = "imagefolder" if name.startswith("imagefolder:") else name.lower()
    if key not in _NATIVE_SIZE:
        raise AugLocalError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return key


def _side(input_size, default: int) -> int:
    if input_size is None:
        return default
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        side = input_size
    elif isinstance(input_size, (tuple, list)) and len(input_size) in (2, 3):
        if len(input_size) == 3 and input_size[0] != 3:
            raise AugLocalError(f"input_size {tuple(input_size)} must have 3 channels; datasets are RGB")
        if input_size[-1] != input_size[-2]:
            raise AugLocalError(f"input_size {tuple(input_size)} must be square, e.g. (3, 32, 32)")
        side = int(input_size[-1])
    else:
        raise AugLocalError(f"input_size must be an int or (C, H, W), got {input_size!r}")
    if side < 8:
        raise AugLocalError(f"input size {side} is too small; use at least 8 pixels")
    return side


def train_augmentation(name: str, side: Optional[int] = None) -> List[v2.Transform]:
    """The random training transforms of dataset ``name`` at ``side`` pixels (see above).

    Args:
        name: ``cifar10``, ``svhn``, ``stl10``, ``fashion-mnist``, ``digits`` or ``synthetic``.
        side: the image side after resizing; default the dataset's native size.
    """
    if name not in _AUGMENT:
        raise AugLocalError(f"no augmentation for dataset {name!r}; choose from {', '.join(_AUGMENT)}")
    native = _NATIVE_SIZE[name]
    side = native if side is None else side
    aug = _AUGMENT[name]
    padding = max(1, round(aug.padding * side / native))
    steps: List[v2.Transform] = [v2.RandomCrop(side, padding=padding, padding_mode=aug.padding_mode)]
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    return steps


def _transform(key: str, side: int, native: int, augment: bool) -> Callable:
    mean, std = _MEAN_STD[key]
    steps = [v2.ToImage()]
    if side != native:
        steps.append(v2.Resize((side, side), antialias=True))
    if augment:
        steps += train_augmentation(key, side)
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


def _torchvision(key: str, data_dir: Optional[str], train_tf, test_tf):
    from torchvision import datasets

    pretty = {"cifar10": "CIFAR-10", "svhn": "SVHN", "stl10": "STL-10"}[key]
    if not data_dir:
        raise AugLocalError(f"{pretty} needs a data directory: pass --data-dir (auglocal-fx never downloads)")
    if not os.path.isdir(data_dir):
        raise AugLocalError(f"data directory {data_dir!r} does not exist; pass the folder that holds {pretty}")
    try:
        if key == "cifar10":
            return (datasets.CIFAR10(data_dir, train=True, transform=train_tf, download=False),
                    datasets.CIFAR10(data_dir, train=False, transform=test_tf, download=False))
        cls = datasets.SVHN if key == "svhn" else datasets.STL10
        return (cls(data_dir, split="train", transform=train_tf, download=False),
                cls(data_dir, split="test", transform=test_tf, download=False))
    except (RuntimeError, OSError):
        expected = {"cifar10": "cifar-10-batches-py/", "svhn": "train_32x32.mat and test_32x32.mat",
                    "stl10": "stl10_binary/"}[key]
        raise AugLocalError(f"{pretty} not found or corrupt in {data_dir!r}; put {expected} there "
                            "(auglocal-fx never downloads)") from None


def _find_idx(data_dir: str, stem: str) -> str:
    for folder in (data_dir, os.path.join(data_dir, "FashionMNIST", "raw"), os.path.join(data_dir, "raw")):
        for suffix in ("", ".gz"):
            path = os.path.join(folder, stem + suffix)
            if os.path.isfile(path):
                return path
    raise AugLocalError(f"Fashion-MNIST file {stem}[.gz] not found in {data_dir!r}; run "
                        "`apt-get install dataset-fashion-mnist` or pass --data-dir")


def _read_idx(path: str) -> torch.Tensor:
    """Read an idx file (optionally gzipped) into a uint8 tensor."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype, ndim = struct.unpack(">HBB", data[:4])
        shape = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
        if zero != 0 or dtype != 0x08:
            raise ValueError("not a uint8 idx file")
        array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as err:
        raise AugLocalError(f"cannot read idx file {path!r} ({err}); reinstall the dataset") from None
    return torch.from_numpy(array.copy())


def _fashion_mnist(data_dir: str, train_tf, test_tf):
    if not os.path.isdir(data_dir):
        raise AugLocalError(f"Fashion-MNIST directory {data_dir!r} does not exist; run "
                            "`apt-get install dataset-fashion-mnist` or pass --data-dir")
    out = []
    for split, tf in (("train", train_tf), ("t10k", test_tf)):
        images = _read_idx(_find_idx(data_dir, f"{split}-images-idx3-ubyte"))
        labels = _read_idx(_find_idx(data_dir, f"{split}-labels-idx1-ubyte")).long()
        images = F.pad(images.unsqueeze(1), (2, 2, 2, 2))  # 28x28 -> 32x32, background is 0
        out.append(_TensorImages(images, labels, tf))
    return out[0], out[1]


def _digits(train_tf, test_tf):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    labels = torch.from_numpy(bunch.target).long()
    rng = np.random.RandomState(0)
    test_idx = []
    for c in range(10):  # fixed stratified split: 20% of each class is test
        idx = np.flatnonzero(bunch.target == c)
        rng.shuffle(idx)
        test_idx += idx[: len(idx) // 5].tolist()
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[test_idx] = True
    return (_TensorImages(images[~is_test], labels[~is_test], train_tf),
            _TensorImages(images[is_test], labels[is_test], test_tf))


def _synthetic(side: int, train_tf, test_tf, train_size: int = 512, test_size: int = 128):
    g = torch.Generator().manual_seed(0)
    patterns = torch.rand(10, 3, side, side, generator=g)

    def make(n: int) -> _TensorImages:
        labels = torch.randint(0, 10, (n,), generator=g)
        noise = torch.rand(n, 3, side, side, generator=g)
        images = (0.6 * noise + 0.4 * patterns[labels]) * 255
        return _TensorImages(images.round().to(torch.uint8), labels, train_tf if n == train_size else test_tf)

    return make(train_size), make(test_size)


def _imagefolder(path: str, side: int, augment: bool):
    from torchvision import datasets

    if not path or not os.path.isdir(os.path.join(path, "train")):
        raise AugLocalError(f"imagefolder:{path} needs {os.path.join(path or 'PATH', 'train')}/<class>/*; "
                            "create it or pass another path")
    test_dir = next((os.path.join(path, s) for s in ("val", "test") if os.path.isdir(os.path.join(path, s))),
                    None)
    if test_dir is None:
        raise AugLocalError(f"imagefolder:{path} needs a val/ or test/ folder beside train/")
    mean, std = _MEAN_STD["imagefolder"]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    if augment:
        train_tf = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(side, antialias=True),
                               v2.RandomHorizontalFlip()] + tail)
    else:
        train_tf = v2.Compose([v2.ToImage(), v2.Resize(side, antialias=True), v2.CenterCrop(side)] + tail)
    test_tf = v2.Compose([v2.ToImage(), v2.Resize(int(round(side * 8 / 7)), antialias=True),
                          v2.CenterCrop(side)] + tail)
    try:
        train = datasets.ImageFolder(os.path.join(path, "train"), transform=train_tf)
        test = datasets.ImageFolder(test_dir, transform=test_tf)
    except (FileNotFoundError, OSError) as err:
        raise AugLocalError(f"cannot read image folder {path!r} ({err}); check its class sub-folders") from None
    if train.classes != test.classes:
        raise AugLocalError(f"imagefolder:{path}: train/ and {os.path.basename(test_dir)}/ have different "
                            "class folders; make them the same")
    return Datasets(train, test, len(train.classes), (3, side, side))
