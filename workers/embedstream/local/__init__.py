"""Local tools, apart from what a production worker imports, in rooms with one job each:

- ``stack``: the embedded stack's processes (a Kafka-protocol broker with its S3 storage and TLS
  front, a CPU Triton server, workers as child processes);
- ``samples``: sample data shared by the demo, the bench, the studies and the tests;
- ``bench``: ``embedstream bench``;
- here: the demo (and its sinks), ``up``, the pipelines they run, readback of output topics,
  retrieval quality, the detector study and the null encoder.

Nothing is imported here, so the CLI can register the bench's subcommand without loading the stack.
"""
