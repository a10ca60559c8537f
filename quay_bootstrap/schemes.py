"""The URL schemes there is an object store for, and the module serving each (no imports: the
agent config checks URLs against it without loading the stores)."""
from __future__ import annotations

from typing import Dict, Tuple

# The one place a URL scheme is mapped to its store. Modules are imported on first use
# (stores.provider), so `quay-bootstrap --help` never loads boto3 or google-cloud-storage.
SCHEMES: Dict[str, str] = {
    "s3": "quay_bootstrap.stores.s3",
    "gs": "quay_bootstrap.stores.gcs",
    "file": "quay_bootstrap.stores.file",
}


def schemes() -> Tuple[str, ...]:
    """The URL schemes there is a store for, in the order to suggest them."""
    return tuple(SCHEMES)
