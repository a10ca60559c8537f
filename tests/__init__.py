"""Tests of quay-bootstrap."""
