"""Process settings for conversion work: one CPU thread for batch-1 passes, and the garbage
collector kept off the objects that were there before."""

import contextlib
import gc
from typing import Iterator

import torch

__all__ = ["single_thread", "old_objects_frozen"]


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


@contextlib.contextmanager
def old_objects_frozen() -> Iterator[None]:
    """Run the body with the objects that exist now out of the garbage collector's reach.

    Converting allocates tens of thousands of small containers (fx nodes, module dicts, copies),
    so the collector runs often, and each full pass walks every object the process holds (about
    450k once torch and timm are imported). Frozen (``gc.freeze``), the old objects are skipped;
    what the body creates is collected as usual, and they are unfrozen after it. Where the caller
    has frozen objects itself, nothing is touched: unfreezing would undo its freeze. (The CLI
    freezes what it imports for good and pauses the collector around ``convert``, see
    ``cli/main.py``: there this does nothing; it is for ``to_local`` called from Python.)
    """
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
