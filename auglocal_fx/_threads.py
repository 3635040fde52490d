"""One CPU thread for batch-1 work (shape passes, FLOP counting)."""

import contextlib
from typing import Iterator

import torch

__all__ = ["single_thread"]


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run the body on one intra-op thread, restoring the setting afterwards.

    Conversion and FLOP counting only push single examples through the network, where extra
    threads gain nothing and, on a machine whose cores are busy, cost a lot (OpenMP barriers):
    ``to_local`` of ResNet-110 took 3 s on one thread and 6-13 s on two busy cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
