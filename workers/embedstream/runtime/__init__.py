"""The embedded local stack: a Kafka-protocol broker and a CPU Triton server as child processes."""

from embedstream.runtime.broker import LocalBroker
from embedstream.runtime.stack import LocalStack
from embedstream.runtime.triton import LocalTriton

__all__ = ["LocalBroker", "LocalStack", "LocalTriton"]
