"""Kafka side of streamtune: the event contract, producers, the local broker and the durable buffer.

Nothing in this package imports torch: it moves and stores events, it does not learn from them.
"""
