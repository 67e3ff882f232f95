"""Benchmarks (not tests): each prints a table and ends with one JSON line."""

from harness import loopback

# Every Ray a benchmark starts (in its process or another) binds and announces 127.0.0.1.
loopback.keep()
