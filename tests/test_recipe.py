"""The paper's recipe: batch size and learning rate defaults, warmup and the per-epoch schedule."""

import math

import pytest

from auglocal_fx.recipe import PAPER_WARMUP_EPOCHS, PAPER_WARMUP_LR, default_recipe, learning_rate


def test_recipe_defaults():
    assert default_recipe("cifar10") == (1024, 0.8)
    assert default_recipe("svhn") == (1024, 0.8)
    assert default_recipe("stl10") == (128, 0.1)
    assert default_recipe("digits", batch_size=256) == (256, 0.2)
    assert default_recipe("cifar10", lr=0.05) == (1024, 0.05)


def test_warmup_values_of_the_authors_schedule():
    # The authors' adjust_learning_rate at lr 0.8, 400 epochs, written out by hand.
    assert PAPER_WARMUP_EPOCHS == 10 and PAPER_WARMUP_LR == 0.01
    assert learning_rate(1, 400, 0.8) == pytest.approx(0.01)
    cos2 = 0.4 * (1 + math.cos(math.pi * 2 / 400))
    assert learning_rate(2, 400, 0.8) == pytest.approx(cos2 * 1 / 10 + 0.01 * 9 / 10)
    cos10 = 0.4 * (1 + math.cos(math.pi * 10 / 400))
    assert learning_rate(10, 400, 0.8) == pytest.approx(cos10 * 9 / 10 + 0.01 * 1 / 10)
    assert learning_rate(11, 400, 0.8) == pytest.approx(0.4 * (1 + math.cos(math.pi * 11 / 400)))
    assert learning_rate(400, 400, 0.8) == pytest.approx(0.0, abs=1e-12)
    rates = [learning_rate(e, 400, 0.8) for e in range(1, 12)]
    assert rates == sorted(rates)  # warmup rises into the cosine


def test_no_warmup_is_the_plain_cosine():
    assert learning_rate(1, 10, 0.1, warmup_epochs=0) == pytest.approx(0.05 * (1 + math.cos(math.pi / 10)))
    assert learning_rate(5, 10, 0.1, warmup_epochs=0) == pytest.approx(0.05)
