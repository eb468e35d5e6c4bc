"""A forked child (a DataLoader worker) never finalizes the parent's garbage: a Ray handle's ``__del__`` run in a
fork hangs the child for good (its Ray core worker's locks belonged to threads the child does not have)."""

from __future__ import annotations

import gc
import importlib
import os

importlib.import_module("trainer.client.cluster")  # importing the client registers the fork hooks


def test_a_forked_child_never_finalizes_the_parents_garbage():
    parent = os.getpid()
    read_end, write_end = os.pipe()

    class Finalized:  # stands for a Ray handle caught in a reference cycle
        def __del__(self):
            os.write(write_end, b"p" if os.getpid() == parent else b"c")

    frozen_before = gc.get_freeze_count()
    gc.disable()
    try:
        garbage = Finalized()
        garbage.cycle = garbage
        del garbage  # unreachable, waiting for the cycle collector
        child = os.fork()
        if child == 0:  # a DataLoader worker's collector runs on its first allocations
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert gc.get_freeze_count() == frozen_before  # the parent's objects are back with its collector
        gc.collect()
    finally:
        gc.enable()
        os.close(write_end)
    assert os.read(read_end, 16) == b"p"  # finalized once, in the parent; never in the child
    os.close(read_end)
