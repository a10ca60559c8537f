"""quay-bootstrap: turns a blank VM into a healthy node of a highly available Quay cluster."""

__version__ = "0.1.0"
