"""The embedded stack's processes: a Kafka-protocol broker (with its S3 storage and TLS front), a CPU
Triton server and worker processes, each a child process on 127.0.0.1, and ``stack.LocalStack`` that
starts them together.

Nothing is imported here, so a test that needs one process does not start loading the others.
"""
