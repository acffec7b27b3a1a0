"""The embedded local stack: a Kafka-protocol broker and a CPU Triton server as child processes."""

from embedstream.local.broker import LocalBroker
from embedstream.local.stack import LocalStack
from embedstream.local.triton import LocalTriton

__all__ = ["LocalBroker", "LocalStack", "LocalTriton"]
