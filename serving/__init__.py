"""Serving side of streamtune: the Ray Serve app, fresh user history, rollout and rollback."""
