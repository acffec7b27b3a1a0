"""Local tools, apart from what a production worker imports: the embedded stack (a Kafka-protocol
broker and a CPU Triton server as child processes), the demo and its sample data, readback, the
bench and its null encoder.

Nothing is imported here, so the CLI can register the bench's subcommand without loading the stack.
"""
