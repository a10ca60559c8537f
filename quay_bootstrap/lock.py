"""The image tag lock: every node runs exactly the Quay release the cluster is locked to (pure)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import yaml

from quay_bootstrap import safe_yaml
from quay_bootstrap.errors import LockViolation

_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_EXAMPLE = "quay.io/projectquay/quay:v3.9.0"


@dataclass(frozen=True)
class ImageRef:
    """A parsed image reference: `repository` includes the registry host when there is one."""

    repository: str
    tag: Optional[str]
    digest: Optional[str]

    @property
    def registry(self) -> str:
        first = self.repository.split("/", 1)[0]
        if "/" in self.repository and ("." in first or ":" in first or first == "localhost"):
            return first
        return "docker.io"

    @property
    def pull_name(self) -> str:
        """What to pull: repo@digest when pinned (exact), else repo:tag."""
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"

    def __str__(self) -> str:
        text = self.repository + (f":{self.tag}" if self.tag else "")
        return text + (f"@{self.digest}" if self.digest else "")


def parse_reference(text: str) -> ImageRef:
    """Split `registry/repo:tag@sha256:...` into its parts.

    Raises:
        LockViolation: the text is not an image reference.
    """
    text = text.strip()
    name, _, digest = text.partition("@")
    if digest and not _DIGEST.match(digest):
        raise LockViolation(f"the digest {digest!r} is not sha256: followed by 64 hex digits",
                            where=text)
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        repository, tag = name.rsplit(":", 1)
    else:
        repository, tag = name, None
    if not repository or not re.fullmatch(r"[a-z0-9]+([._/:-][a-z0-9]+)*", repository):
        raise LockViolation("not an image reference", where=text,
                            hint=f"Write e.g. {_EXAMPLE}")
    return ImageRef(repository, tag or None, digest or None)


# Tags that float to the newest release of a line (v3, 3.9, v3.9): never a lock, whatever
# image.allowed_tags says.
_FLOATING = re.compile(r"v?\d+(\.\d+)?")


def check_policy(ref: ImageRef, allowed_tags: str, source: str = "image.reference") -> ImageRef:
    """Refuse floating tags before anything is pulled.

    Raises:
        LockViolation: no tag, `latest`, or a tag that does not match `allowed_tags`.
    """
    fix = (f"Lock to a fixed release tag, e.g. {ref.repository}:v3.9.0 (optionally "
           f"@sha256:... to pin the exact image)")
    if not ref.tag:
        raise LockViolation(f"{source} {ref} has no tag, so it floats to whatever 'latest' is "
                            "when a node boots", where=source, hint=fix)
    if ref.tag == "latest" or _FLOATING.fullmatch(ref.tag) or \
            not re.fullmatch(allowed_tags, ref.tag):
        raise LockViolation(f"{source} {ref} uses the tag {ref.tag!r}, which is not a fixed "
                            f"release (image.allowed_tags is {allowed_tags!r}); mixed Quay "
                            "versions in one cluster are unsupported", where=source, hint=fix)
    return ref


@dataclass(frozen=True)
class Resolved:
    ref: ImageRef
    overridden: bool  # the cluster lock replaced the reference in the local config


def resolve(local: str, allowed_tags: str, lock_text: Optional[bytes] = None,
            lock_url: str = "") -> Resolved:
    """The image this node must run: the cluster lock when there is one, else the local config.

    Args:
        local: image.reference from the agent config.
        lock_text: the cluster lock file's bytes (YAML with `reference:` and optional `digest:`).

    Raises:
        LockViolation: either reference breaks the policy, or the lock cannot be parsed.
    """
    local_ref = check_policy(parse_reference(local), allowed_tags)
    if lock_text is None:
        return Resolved(local_ref, False)
    try:
        data = safe_yaml.load(lock_text)
    except (UnicodeDecodeError, yaml.YAMLError) as err:
        raise LockViolation("the cluster image lock is not valid YAML",
                            where=f"{lock_url} {safe_yaml.where(err, lock_text)}",
                            hint=f"Write it as `reference: {_EXAMPLE}` and optionally "
                                 "`digest: sha256:...`") from None
    if not isinstance(data, dict) or not isinstance(data.get("reference"), str) or \
            set(data) - {"reference", "digest"}:
        raise LockViolation("the cluster image lock must be a mapping with `reference:` and "
                            "optionally `digest:`, nothing else", where=lock_url,
                            hint=f"Write e.g. `reference: {_EXAMPLE}`")
    ref = parse_reference(data["reference"])
    digest = data.get("digest")
    if digest is not None:
        if not isinstance(digest, str) or not _DIGEST.match(digest):
            raise LockViolation(f"the lock's digest {digest!r} is not sha256: and 64 hex digits",
                                where=lock_url)
        if ref.digest and ref.digest != digest:
            raise LockViolation("the lock's reference and digest name different images",
                                where=lock_url)
        ref = ImageRef(ref.repository, ref.tag, digest)
    check_policy(ref, allowed_tags, source=f"the cluster lock {lock_url}")
    if ref.repository != local_ref.repository:
        # The registry password or ECR token goes wherever the reference points.
        raise LockViolation(f"the cluster lock names the image {ref.repository}, but this "
                            f"node's image.reference is {local_ref.repository}: a lock may only "
                            "change the tag and digest", where=lock_url,
                            hint="Change image.reference on the nodes (a new machine image) to "
                                 "move to another registry or repository")
    return Resolved(ref, str(ref) != str(local_ref))
