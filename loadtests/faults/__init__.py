"""Fault suite: a TCP fault proxy in front of S3 (moto), outage scenarios, kill -9 consistency checks."""
