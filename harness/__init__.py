"""What tests and benchmarks start around the product: real servers, clusters, clients, faults.

Tests and benchmarks import this package; the product (``streams``, ``training``, ``serving``,
``services``) never does. Nothing here is imported on the package's import: ``harness.gpu_check``
runs where only PyTorch is installed. The embedded Kafka broker stays in the product
(``streams.broker``): `streamtune kafka up` and the demo start it for users.
"""
