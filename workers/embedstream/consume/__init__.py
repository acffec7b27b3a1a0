"""The one consume-and-commit core: poll, intake, batch, outage hold, dead letters, finished offsets,
delivery (at-least-once | exactly-once), rebalance, status. The worker and every store sink plug a
``Stage`` into ``ConsumeLoop``; the rooms, in the order a message passes them:

    intake -> batcher -> dispatch (+ outage) -> stage -> outbox (+ offsets) -> delivery
                                       loop, rebalance: around all of them
"""

from embedstream.consume.loop import ConsumeLoop, LoopConfig, LoopStats
from embedstream.consume.outbox import Outbox
from embedstream.consume.stage import Processed, Stage

__all__ = ["ConsumeLoop", "LoopConfig", "LoopStats", "Outbox", "Processed", "Stage"]
