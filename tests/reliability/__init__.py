"""Reliability suites: store outages, crash consistency, hostile input, load and soak."""
