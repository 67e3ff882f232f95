"""Long-lived processes take what they built at start-up out of the cyclic collector's walk.

CPython's full collection walks every object the interpreter tracks. A process that has imported
torch, transformers, Ray and FastAPI (a Serve replica, ``up``'s own process) tracks ~550,000 of
them before it does anything, and one full collection took 170-290 ms on this project's 2-core
test machine, 450 ms in a replica started under load: the whole process stalls meanwhile, so a
replica's requests, or ``up``'s ingest and rounds, wait that long. Full collections come whenever
the objects that survived younger collections reach a quarter of those walked, so a process that
keeps loading versions or buffering keeps paying them.

What was imported and built at start lives as long as the process, so ``freeze_startup`` moves
it to the interpreter's permanent generation (``gc.freeze``): later collections walk only what was
created since. Frozen objects are still freed by reference counting when dropped; only garbage in
a reference cycle among them would never be collected, which is why the start-up's own garbage is
collected first.

At exit they go back to the collector: extension modules that count their objects still alive at
interpreter shutdown (nanobind's, in triton, which torch imports) would otherwise print every
frozen one they own as leaked.
"""

from __future__ import annotations

import atexit
import gc


def freeze_startup() -> int:
    """Collect, then freeze every object tracked now; returns how many are frozen."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)  # once, however often a process calls this
    atexit.register(gc.unfreeze)
    return gc.get_freeze_count()
