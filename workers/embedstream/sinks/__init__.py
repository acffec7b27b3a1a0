"""Where the worker's rows go: the Arrow output contract and the Kafka publisher of embeddings."""
