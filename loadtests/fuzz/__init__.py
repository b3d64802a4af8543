"""Fuzz suite: structured mutations of adapter files (Hypothesis) and schemathesis against /schema."""
