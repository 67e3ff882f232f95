"""Long-running processes (ingest, the continual loop) and the `streamtune` CLI."""
