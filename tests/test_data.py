"""Datasets: names, shapes, the offline datasets, and errors for missing data."""

import os

import pytest
import torch

from auglocal_fx import AugLocalError
from torchvision.transforms import v2

from auglocal_fx.data import build_datasets, dataset_geometry, train_augmentation


def test_synthetic_shapes_and_determinism():
    a = build_datasets("synthetic", augment=False)
    b = build_datasets("synthetic", augment=False)
    x, y = a.train[3]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    assert a.num_classes == 10 and a.input_size == (3, 32, 32)
    assert torch.equal(x, b.train[3][0])


def test_input_size_resizes():
    data = build_datasets("synthetic", input_size=16)
    assert data.train[0][0].shape == (3, 16, 16) and data.input_size == (3, 16, 16)


def test_augmentation_is_random_and_test_set_is_not():
    data = build_datasets("synthetic")
    torch.manual_seed(0)
    views = [data.train[0][0] for _ in range(8)]
    assert any(not torch.equal(views[0], v) for v in views[1:])
    assert torch.equal(data.test[0][0], data.test[0][0])


def test_digits_offline_split():
    data = build_datasets("digits")
    assert len(data.train) + len(data.test) == 1797
    assert len(data.test) == 355  # 20% of each class, fixed
    x, y = data.test[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10
    assert torch.equal(x[0], x[1])  # grey replicated to RGB


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_from_debian_package():
    data = build_datasets("fashion-mnist")
    assert (len(data.train), len(data.test), data.num_classes) == (60000, 10000, 10)
    assert data.train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("name", ["cifar10", "svhn", "stl10"])
def test_missing_torchvision_dataset_is_a_clear_error(name, tmp_path):
    with pytest.raises(AugLocalError, match="never downloads"):
        build_datasets(name, str(tmp_path))
    with pytest.raises(AugLocalError, match="does not exist"):
        build_datasets(name, str(tmp_path / "nope"))
    with pytest.raises(AugLocalError, match="--data-dir"):
        build_datasets(name, None)


def test_missing_fashion_mnist_dir(tmp_path):
    with pytest.raises(AugLocalError, match="dataset-fashion-mnist"):
        build_datasets("fashion-mnist", str(tmp_path))


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / split / cls / "a.png")
    data = build_datasets(f"imagefolder:{tmp_path}", input_size=16)
    assert data.num_classes == 2 and data.train[0][0].shape == (3, 16, 16)
    with pytest.raises(AugLocalError, match="train"):
        build_datasets(f"imagefolder:{tmp_path / 'missing'}")


def test_unknown_name_lists_choices():
    with pytest.raises(AugLocalError, match="choose from"):
        build_datasets("mnist-ish")
    with pytest.raises(AugLocalError, match="square"):
        build_datasets("synthetic", input_size=(3, 16, 32))


def _describe(transforms):
    out = []
    for t in transforms:
        if isinstance(t, v2.RandomCrop):
            out.append(("crop", t.size[0], t.padding[0], t.padding_mode))
        elif isinstance(t, v2.RandomHorizontalFlip):
            out.append(("flip",))
        else:
            out.append((type(t).__name__,))
    return out


def test_per_dataset_augmentation_is_the_authors():
    # their train.py: CIFAR reflect-pads 4 and flips; SVHN pads 2, no flip; STL-10 pads 4 at 96 px
    assert _describe(train_augmentation("cifar10")) == [("crop", 32, 4, "reflect"), ("flip",)]
    assert _describe(train_augmentation("svhn")) == [("crop", 32, 2, "constant")]
    assert _describe(train_augmentation("stl10")) == [("crop", 96, 4, "constant"), ("flip",)]
    assert _describe(train_augmentation("fashion-mnist")) == [("crop", 32, 4, "constant"), ("flip",)]
    assert _describe(train_augmentation("digits")) == [("crop", 32, 4, "constant")]
    assert _describe(train_augmentation("cifar10", side=16)) == [("crop", 16, 2, "reflect"), ("flip",)]
    with pytest.raises(AugLocalError, match="no augmentation"):
        train_augmentation("imagenet")


def test_build_datasets_applies_the_augmentation_list():
    data = build_datasets("synthetic", input_size=16)
    steps = data.train.transform.transforms
    assert _describe([t for t in steps if isinstance(t, (v2.RandomCrop, v2.RandomHorizontalFlip))]) == \
        _describe(train_augmentation("synthetic", side=16))
    assert not any(isinstance(t, v2.RandomCrop) for t in data.test.transform.transforms)


@pytest.mark.parametrize("name, size", [("synthetic", None), ("digits", 16)])
def test_dataset_geometry_matches_build_datasets(name, size):
    data = build_datasets(name, input_size=size, augment=False)
    assert dataset_geometry(name, size) == (data.num_classes, data.input_size)
