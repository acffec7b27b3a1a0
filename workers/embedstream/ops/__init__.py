"""Operations commands: ``config check``, ``tail``, ``replay`` and ``dlq list|redrive``.

They read and write Kafka with group-less consumers (assign + seek), so they never join, rebalance
or commit offsets for a worker group, and can run beside live workers.
"""
