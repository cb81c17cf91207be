"""The serving shell's process-level knobs and counters (the core's are in ServeConfig)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from recloop.serving.snapshots import InstallResult


@dataclass(frozen=True)
class ServeOptions:
    """Process-level knobs of the serving shell."""

    batch_size: int = 256
    """Most requests answered per batch."""
    poll_timeout_s: float = 0.1
    """Longest wait for a request before the loop looks at its other duties."""
    warm_up_s: float = 15.0
    """Longest wait at start for the announced snapshots to be read and installed (a restart
    normally catches up within seconds; past this it serves anyway, and says so)."""
    commit_every_s: float = 1.0
    """How often slates are confirmed and request offsets committed."""
    group_id: str = "recloop-serve"
    """Consumer group of the request loop (replicas share the requests), under the
    deployment's topic prefix."""
    name: str = "recloop-serve"
    """This consumer's name in dead-letter headers."""
    index_kind: str = "auto"
    """faiss index kind, for the catalogue's features and for snapshots' learned item
    embeddings (see serving.retrieval: ``auto`` chooses by size)."""
    faiss_threads: int = 1
    """OpenMP threads per faiss search. One query at a time is fastest on one thread, and
    idle OpenMP workers spinning on a busy machine multiply tail latency. (OpenMP keeps the
    setting per thread: the service sets it in the thread that answers requests; index
    builds, in their own threads, use every core.)"""


@dataclass
class ServeStats:
    """What the shell did, for the CLI's status line and for tests."""

    requests: int = 0
    slates: int = 0
    invalid: int = 0
    batches: int = 0
    compute_s: float = 0.0
    waiting_for_catalogue: int = 0
    """Rounds that read no request because no catalogue was serving yet."""
    installs: deque[InstallResult] = field(default_factory=lambda: deque(maxlen=1000))
