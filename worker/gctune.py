"""Garbage-collector settings for a long-running process that allocates a lot.

Each session allocates many short-lived objects (decoded turns, rows, sentences) while the
process keeps a large long-lived heap (modules, clients, pools). With CPython's defaults a
young collection runs every 700 net allocations and the older ones walk that whole heap:
measured on `flush --all`, a sixth of the process's CPU. Freezing what exists after start-up
takes it out of every later collection, and a higher first threshold makes collections rarer.
The code makes few reference cycles, so little waits longer to be freed.
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
