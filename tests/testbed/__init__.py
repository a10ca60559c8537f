"""Test bed: the real services the integration tests talk to."""
