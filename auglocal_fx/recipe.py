"""The paper's training recipe as pure functions: batch size, learning rate and its schedule.

The authors' ``train.py`` (SGD, Nesterov momentum 0.9, weight decay 1e-4) sets the learning rate
once per epoch, before the epoch runs, with a cosine schedule and a linear warmup from 0.01 over
the first 10 epochs (their ``adjust_learning_rate``, with epochs counted from 1). The last epoch
therefore runs at learning rate 0, as theirs does.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

__all__ = ["PAPER_WARMUP_EPOCHS", "PAPER_WARMUP_LR", "default_recipe", "default_warmup_epochs", "learning_rate"]

PAPER_WARMUP_EPOCHS = 10
PAPER_WARMUP_LR = 0.01


def default_recipe(dataset: str, batch_size: Optional[int] = None,
                   lr: Optional[float] = None) -> Tuple[int, float]:
    """The paper's batch size and peak learning rate for ``dataset``, with overrides applied.

    CIFAR-10/SVHN: 1024 and 0.8; STL-10: 128 and 0.1; other datasets: batch 128. A missing
    learning rate follows ``lr = 0.1 * batch_size / 128`` (which gives both paper settings).
    """
    if batch_size is None:
        batch_size = 1024 if dataset in ("cifar10", "svhn") else 128
    if lr is None:
        lr = 0.1 * batch_size / 128
    return batch_size, lr


def default_warmup_epochs(epochs: int) -> int:
    """The warmup of a run of ``epochs`` epochs: the paper's 10, at most 5% of the run.

    The paper warms up 10 of 400 epochs; a short run keeps that small share instead of spending
    most of itself near the warmup's starting rate (``min(10, epochs // 20)``: none below 20).
    """
    return min(PAPER_WARMUP_EPOCHS, epochs // 20)


def learning_rate(epoch: int, epochs: int, base_lr: float,
                  warmup_epochs: int = PAPER_WARMUP_EPOCHS,
                  warmup_lr: float = PAPER_WARMUP_LR) -> float:
    """The learning rate of epoch ``epoch`` (counted from 1), as the authors' code sets it.

    ``cos(e) = base_lr / 2 * (1 + cos(pi * e / epochs))``. During warmup (``e <= W``) the rate
    blends from ``warmup_lr`` into the cosine: ``cos(e) * (e - 1) / W + warmup_lr * (W + 1 - e) / W``;
    afterwards it is ``cos(e)``. ``warmup_epochs=0`` gives the plain cosine.

    Args:
        epoch: 1 for the first epoch.
        epochs: the run's number of epochs.
        base_lr: the peak learning rate.
        warmup_epochs: ``W``, the paper's 10 by default.
        warmup_lr: the first epoch's rate, the paper's 0.01.
    """
    cosine = 0.5 * base_lr * (1.0 + math.cos(math.pi * epoch / epochs))
    if epoch <= warmup_epochs:
        return cosine * (epoch - 1) / warmup_epochs + warmup_lr * (warmup_epochs + 1 - epoch) / warmup_epochs
    return cosine
