"""Load and soak suite: locust (headless, loopback, bounded) against a real server."""
