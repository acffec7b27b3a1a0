"""embedstream: turn raw Kafka streams into embeddings served by Triton, published as Arrow."""

from embedstream.sinks.arrow_codec import decode_embeddings

__all__ = ["__version__", "decode_embeddings"]
__version__ = "0.1.0"
