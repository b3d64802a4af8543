"""HTTP controllers, one per domain."""
