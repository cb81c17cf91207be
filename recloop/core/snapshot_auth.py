"""Who may announce a snapshot: the learner's HMAC over a ``PolicyPublished``.

Anyone who can write to ``policy.snapshots`` can announce anything, so with a snapshot key
(``RECLOOP_SNAPSHOT_KEY``, shared by the learner and every reader) the learner signs each
announcement and readers refuse one that is unsigned or signed wrongly:

    signature = HMAC-SHA256(key, canonical(policy, algorithm, version, path,
                                          weights_sha256, manifest_sha256))

``canonical`` is a JSON array (a domain tag first) with no whitespace and ASCII escapes,
so no two field tuples encode alike. The hashes the reader then checks the files against
are the learner's, not whatever a forger wrote: a replay with another path, version or hash
fails. Replaying an announcement unchanged is harmless (its version is stale or the same).

Without a key (a local experiment), announcements are not authenticated: a reader that has
the database cross-checks the hashes against storage's snapshot row (the monitor), and
serving relies on confinement (``core.snapshot.resolve_announced``: only directories under
the snapshot root, named as the learner names them) and says so once in its log.

The key is a ``pydantic.SecretStr`` end to end and is never logged or put in an error.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import secrets

import msgspec
from pydantic import SecretStr

from recloop.core.events import PolicyPublished
from recloop.core.snapshot import SnapshotError

log = logging.getLogger(__name__)

_DOMAIN = "recloop-policy-published/1"


def key_bytes(key: SecretStr | str | bytes | None) -> bytes | None:
    """The raw key, or ``None`` when none (or an empty one) is configured."""
    if key is None:
        return None
    if isinstance(key, SecretStr):
        key = key.get_secret_value()
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    return raw or None


def canonical(published: PolicyPublished) -> bytes:
    """The bytes the signature covers (see the module docstring)."""
    fields = [
        _DOMAIN,
        published.policy,
        published.algorithm,
        published.version,
        published.path,
        published.weights_sha256,
        published.manifest_sha256,
    ]
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def signature(published: PolicyPublished, key: bytes) -> str:
    """Hex HMAC-SHA256 of ``published`` under ``key``."""
    return hmac.new(key, canonical(published), hashlib.sha256).hexdigest()


def sign(published: PolicyPublished, key: SecretStr | str | bytes | None) -> PolicyPublished:
    """``published`` with its ``signature`` set (unchanged, unsigned, without a key)."""
    raw = key_bytes(key)
    if raw is None:
        return published
    return msgspec.structs.replace(published, signature=signature(published, raw))


def verify(published: PolicyPublished, key: SecretStr | str | bytes | None) -> bool:
    """Check ``published``'s signature; ``True`` if it was authenticated, ``False`` when no
    key is configured (nothing to check). Raises ``SnapshotError`` for an unsigned or badly
    signed announcement when there is a key."""
    raw = key_bytes(key)
    if raw is None:
        return False
    if not published.signature:
        raise SnapshotError("announcement is unsigned and a snapshot key is configured")
    if not hmac.compare_digest(published.signature, signature(published, raw)):
        raise SnapshotError("announcement's signature does not verify under the snapshot key")
    return True


def check_recorded(published: PolicyPublished, record: dict | None) -> bool:
    """Cross-check ``published``'s hashes against storage's row of that snapshot; ``True``
    if they match, ``False`` when there is no row. Raises ``SnapshotError`` on a mismatch."""
    if record is None:
        return False
    for field in ("weights_sha256", "manifest_sha256"):
        if record.get(field) != getattr(published, field):
            raise SnapshotError(f"announcement's {field} is not the one storage recorded "
                                f"for {published.policy!r} v{published.version}")  # fmt: skip
    return True


@functools.cache
def warn_unauthenticated(process: str) -> None:
    """Log once per process kind that announcements are not authenticated."""
    log.warning("%s: no snapshot key (RECLOOP_SNAPSHOT_KEY): snapshot announcements are not "
                "authenticated, only confined to the snapshot root", process)  # fmt: skip


@functools.cache
def _launch_secret() -> bytes:
    return secrets.token_bytes(32)


def launch_key(scope: str) -> SecretStr:
    """A key for the child processes one launcher starts (``recloop demo``, chaos): the same
    for every call with the same ``scope`` in this process, so restarted children share it,
    and unguessable from outside it."""
    digest = hmac.new(_launch_secret(), scope.encode("utf-8"), hashlib.sha256).hexdigest()
    return SecretStr(digest)
