"""The consumer-group listener: a rebalance drains and forgets, or takes partitions, through the worker."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Protocol

from kafka import KafkaConsumer
from kafka.consumer.subscription_state import AsyncConsumerRebalanceListener
from kafka.future import Future
from kafka.structs import TopicPartition

log = logging.getLogger("embedstream.worker")


class RebalanceSteps(Protocol):
    def on_revoked(self, partitions: list[TopicPartition]) -> None:
        """Finish and commit what was consumed, then drop the partitions' state."""

    def on_assigned(self, partitions: list[TopicPartition]) -> None:
        """Take the partitions."""


class RebalanceListener(AsyncConsumerRebalanceListener):
    """Runs the worker's rebalance steps on a thread of their own while the consumer's IO loop waits.

    kafka-python calls listeners on its IO thread, which refuses a blocking consumer call such as
    the commit a drain ends with ("Cannot block on net.run() from the IO thread"). The loop awaits
    the step instead, so the commit goes through it; the worker's own thread is parked in poll() or
    close() meanwhile, so the worker's state still has one user at a time.
    """

    def __init__(self, worker: RebalanceSteps, consumer: KafkaConsumer) -> None:
        self._worker = worker
        # Wakes the IO loop from its select() once a step is done (else it notices at its next timer).
        self._wake: Callable[[], None] = getattr(getattr(consumer, "_net", None), "wakeup", lambda: None)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        log.info("partitions revoked: %s", sorted(revoked))
        await self._off_loop(self._worker.on_revoked, list(revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(assigned))
        await self._off_loop(self._worker.on_assigned, list(assigned))

    def _off_loop(self, step: Callable[[list[TopicPartition]], None], partitions: list[TopicPartition]) -> Future:
        done = Future()

        def run() -> None:
            try:
                step(partitions)
            except BaseException as exc:  # handed to the awaiting coordinator, which logs it
                done.failure(exc)
            else:
                done.success(None)
            self._wake()

        threading.Thread(target=run, name="rebalance", daemon=True).start()
        return done
