"""Tune CPython's cyclic garbage collector for a worker's steady state.

A worker allocates tens of thousands of short-lived containers a second (a time-series message
parses into 33 lists; a poll holds hundreds of records). With the default thresholds (700, 10, 10)
a young collection runs every 700 container allocations and every tenth one also walks the older
generation, which holds everything imported at start-up: on the time-series stream that was about
a third of the decode time (a 256-window poll: 33 against 21 us a window with collections off).
Almost none of this garbage is cyclic (reference counting frees it), so the collector is asked to
run far less often, and what start-up made is frozen out of its walks (``gc.freeze``).
"""

from __future__ import annotations

import gc

# Young collections after this many net container allocations: a few polls' worth, a few MB at most.
GEN0_THRESHOLD = 50_000
GEN1_THRESHOLD = 20
GEN2_THRESHOLD = 100


def tune_collector() -> None:
    """Freeze what exists now (call it once start-up is done) and raise the collection thresholds."""
    gc.collect()  # start-up's own garbage goes now, not into the frozen generation
    gc.freeze()
    gc.set_threshold(GEN0_THRESHOLD, GEN1_THRESHOLD, GEN2_THRESHOLD)
