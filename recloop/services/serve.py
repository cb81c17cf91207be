"""``recloop serve``'s process shell: Kafka in, the pure serving core, Kafka out.

Three loops, one per job, so none waits for another:

- the request loop (the caller's thread) reads ``rec.requests`` in batches through the
  dead-letter consumer, answers them with ``serving.server.SlateServer`` and produces one
  ``SlateServed`` per request on ``rec.slates``. It commits request offsets only after the
  slates before them were acknowledged, so a crash answers a request twice, never zero
  times. Requests that decode but cannot be answered (k above the candidates, duplicate
  candidates, ...) are dead-lettered too, re-encoded, with the same headers;
- the side loop reads the whole ``session.state`` changelog into the local cache and
  ``policy.snapshots`` announcements (as a group of its own, from the beginning, without
  committing: every replica needs all of both);
- the installer loop reads, verifies and loads announced snapshots and builds their faiss
  index, then swaps. It works off the request path, so a swap never stalls a request, and
  keeps only the newest pending announcement per policy.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from confluent_kafka import KafkaException

from recloop import metrics
from recloop.core import codec
from recloop.core.dlq import dlq_headers
from recloop.core.events import PolicyPublished, RecRequest, SessionState, SlateServed
from recloop.core.settings import Settings
from recloop.core.snapshot import describe_snapshot
from recloop.kafka.clients import DeliveryTracker, flush_or_raise, make_producer, produce_records
from recloop.kafka.dlq import Consumed, DeadLetterConsumer
from recloop.serving.fallback import PopularityCounts
from recloop.serving.host import PolicyHost
from recloop.serving.server import ItemFeatures, ServeConfig, SlateServer, validate_request
from recloop.serving.session_cache import SessionCache
from recloop.serving.snapshots import InstallResult, PolicyLoader, SnapshotInstaller

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    """Process-level knobs of the serving shell."""

    batch_size: int = 256
    """Most requests answered per batch."""
    poll_timeout_s: float = 0.1
    """Longest wait for a request before the loop looks at its other duties."""
    commit_every_s: float = 1.0
    """How often slates are confirmed and request offsets committed."""
    group_id: str = "recloop-serve"
    """Consumer group of the request loop (replicas share the requests)."""
    name: str = "recloop-serve"
    """This consumer's name in dead-letter headers."""
    index_kind: str = "auto"
    """faiss index kind for snapshot item embeddings (see serving.retrieval)."""
    faiss_threads: int = 1
    """OpenMP threads per faiss search. One query at a time is fastest on one thread, and
    idle OpenMP workers spinning on a busy machine multiply tail latency."""


@dataclass
class ServeStats:
    """What the shell did, for the CLI's status line and for tests."""

    requests: int = 0
    slates: int = 0
    invalid: int = 0
    batches: int = 0
    compute_s: float = 0.0
    installs: deque[InstallResult] = field(default_factory=lambda: deque(maxlen=1000))


class ServeService:
    """Wire settings, the serving core and Kafka; ``run`` until told to stop."""

    def __init__(
        self,
        settings: Settings,
        config: ServeConfig,
        loader: PolicyLoader,
        *,
        item_features: ItemFeatures | None = None,
        options: ServeOptions | None = None,
    ) -> None:
        self.settings = settings
        self.options = options or ServeOptions()
        faiss.omp_set_num_threads(self.options.faiss_threads)
        self.topics = settings.topics
        self.host = PolicyHost(config.learned_policies)
        self.cache = SessionCache(PopularityCounts(config.n_items))
        self.server = SlateServer(config, self.host, self.cache, item_features)
        self.installer = SnapshotInstaller(
            self.host, loader, settings.resolved_snapshot_dir, self.options.index_kind
        )
        self.stats = ServeStats()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._pending: dict[str, PolicyPublished] = {}
        self._pending_cv = threading.Condition()
        self._errors: deque[str] = deque(maxlen=20)
        self.producer = make_producer(settings, {"linger.ms": 1})
        self.deliveries = DeliveryTracker()
        self._requests: DeadLetterConsumer | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every loop to finish (safe from a signal handler)."""
        self._stop.set()
        with self._pending_cv:
            self._pending_cv.notify_all()

    def run(
        self,
        max_seconds: float | None = None,
        on_tick: Callable[[dict[str, Any]], None] | None = None,
        tick_every_s: float = 5.0,
    ) -> ServeStats:
        """Serve until ``stop()`` (or ``max_seconds``); returns the final stats."""
        requests = DeadLetterConsumer(
            self.settings, ["rec.requests"], self.options.group_id, self.options.name,
            producer=self.producer,
        )  # fmt: skip
        self._requests = requests
        side = threading.Thread(target=self._side_loop, name="serve-side", daemon=True)
        installer = threading.Thread(target=self._install_loop, name="serve-install", daemon=True)
        side.start()
        installer.start()
        try:
            self._request_loop(requests, max_seconds, on_tick, tick_every_s)
        finally:
            self.stop()
            try:
                self._confirm_and_commit(requests)
            finally:
                requests.close()
                side.join(timeout=10)
                installer.join(timeout=30)
        return self.stats

    # -- the request loop --------------------------------------------------------------------

    def _request_loop(
        self,
        consumer: DeadLetterConsumer,
        max_seconds: float | None,
        on_tick: Callable[[dict[str, Any]], None] | None,
        tick_every_s: float,
    ) -> None:
        start = last_commit = last_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if max_seconds is not None and now - start >= max_seconds:
                break
            try:
                batch = self._next_batch(consumer)
            except KafkaException as exc:
                if exc.args[0].fatal():
                    raise
                # Transient broker trouble (a leader moving, a reconnect): note it, keep going.
                self._errors.append(f"poll: {exc}")
                time.sleep(0.1)
                continue
            if not self.ready.is_set() and consumer.consumer.assignment():
                self.ready.set()
            if batch:
                self._answer(batch, consumer)
            self.producer.poll(0)
            if now - last_commit >= self.options.commit_every_s:
                self._confirm_and_commit(consumer)
                last_commit = now
            if on_tick is not None and now - last_tick >= tick_every_s:
                on_tick(self.snapshot_stats())
                last_tick = now

    def _next_batch(self, consumer: DeadLetterConsumer) -> list[Consumed]:
        """Whatever requests are buffered, up to a batch; if none, wait for the first one.

        ``consume(n, timeout)`` waits until it has n messages or the timeout passes, which
        would hold a lone request for the whole timeout. Asking for what is already there,
        and otherwise for just one, answers as soon as a request arrives and still batches
        under load.
        """
        size = self.options.batch_size
        batch = consumer.poll_batch(size, timeout=0)
        if batch:
            return batch
        batch = consumer.poll_batch(1, timeout=self.options.poll_timeout_s)
        if batch and size > 1:
            batch += consumer.poll_batch(size - 1, timeout=0)
        return batch

    def _answer(self, batch: list[Consumed], consumer: DeadLetterConsumer) -> None:
        valid: list[RecRequest] = []
        for item in batch:
            request = item.value
            assert isinstance(request, RecRequest)
            problem = validate_request(request, self.server.config.n_items)
            if problem is None:
                valid.append(request)
            else:
                self._dead_letter(item, problem)
        t0 = time.perf_counter()
        slates = self.server.serve_batch(valid)
        self.stats.compute_s += time.perf_counter() - t0
        produce_records(
            self.producer, self.topics.slates, slates, _user_key, on_delivery=self.deliveries
        )
        _export_slates(self.topics.slates, slates)
        self.stats.requests += len(batch)
        self.stats.slates += len(slates)
        self.stats.batches += 1

    def _dead_letter(self, item: Consumed, problem: str) -> None:
        """Send a request that decodes but cannot be answered to ``rec.requests.dlq``."""
        headers = dlq_headers(
            f"unanswerable request: {problem}", item.topic, item.partition, item.offset,
            self.options.name,
        )  # fmt: skip
        while True:
            try:
                self.producer.produce(
                    self.topics.dlq(item.topic), key=item.key, value=codec.encode(item.value),
                    headers=headers, on_delivery=self.deliveries,
                )  # fmt: skip
                break
            except BufferError:
                self.producer.poll(0.1)
        self.stats.invalid += 1

    def _confirm_and_commit(self, consumer: DeadLetterConsumer) -> None:
        # Every slate (and dead letter) before these offsets must be on the broker first.
        flush_or_raise(self.producer, self.deliveries)
        try:
            consumer.commit()
        except KafkaException as exc:
            # A rebalance can reject the commit; the requests will be answered again, not lost.
            self._errors.append(f"commit: {exc}")

    # -- session state and announcements -----------------------------------------------------

    def _side_loop(self) -> None:
        group = f"{self.options.group_id}-side-{uuid.uuid4().hex[:12]}"
        consumer = DeadLetterConsumer(
            self.settings, ["session.state", "policy.snapshots"], group,
            f"{self.options.name}-side",
        )  # fmt: skip
        try:
            while not self._stop.is_set():
                for item in consumer.poll_batch(1000, timeout=0.1):
                    record = item.value
                    if isinstance(record, SessionState):
                        self.cache.update(record)
                    elif isinstance(record, PolicyPublished):
                        self._announce(record)
        except Exception as exc:  # keep serving on the last known state; say why
            self._errors.append(f"side loop stopped: {type(exc).__name__}: {exc}")
            log.exception("session-state/snapshot consumer stopped")
        finally:
            consumer.close()

    def _announce(self, published: PolicyPublished) -> None:
        with self._pending_cv:
            queued = self._pending.get(published.policy)
            if queued is None or published.version > queued.version:
                self._pending[published.policy] = published
            self._pending_cv.notify_all()

    def _install_loop(self) -> None:
        while True:
            with self._pending_cv:
                while not self._pending and not self._stop.is_set():
                    self._pending_cv.wait(timeout=0.5)
                if self._stop.is_set():
                    return
                name = next(iter(self._pending))
                published = self._pending.pop(name)
            try:
                result = self.installer.install(published)
            except Exception as exc:  # the loop must outlive any one bad snapshot
                self._errors.append(f"install {name} v{published.version}: {exc!r}")
                continue
            self.stats.installs.append(result)
            if result.status == "swapped":
                _export_swap(published, self.installer.resolve(published.path))
            if result.status == "refused":
                log.warning("refused snapshot %s v%d: %s", name, published.version, result.reason)

    # -- reporting ---------------------------------------------------------------------------

    def snapshot_stats(self) -> dict[str, Any]:
        """A JSON-able view of the counters."""
        versions = {name: self.host.version(name) for name in self.host.names}
        return {
            "requests": self.stats.requests,
            "slates": self.stats.slates,
            "invalid": self.stats.invalid,
            "undecodable": self._requests.stats.dead_lettered if self._requests else 0,
            "sessions_cached": len(self.cache),
            "versions": versions,
            "installs": dict(self.installer.counts),
            "last_refusal": self.installer.last_refusal,
            "policy_errors": self.server.stats.get("policy_errors", 0),
            "compute_ms_per_request": 1000 * self.stats.compute_s / max(self.stats.slates, 1),
            "errors": list(self._errors),
        }


def _user_key(slate: SlateServed) -> str:
    return slate.user_id


# -- wiring ----------------------------------------------------------------------------------


def learner_loader(preset: str, seed: int = 0, **world_options: Any) -> PolicyLoader:
    """The production loader: ``learner.registry.load_policy`` with the preset's WorldSpec.

    A manifest that records its own ``spec`` (the sizes it was trained with) wins over the
    preset's, so a snapshot is always rebuilt with the shapes of its tensors.
    """
    import torch

    from recloop.learner import registry
    from recloop.learner.spec import WorldSpec
    from recloop.worlds import learner_spec

    # Inference on small batches: one thread, so serving does not fight the other processes.
    torch.set_num_threads(1)
    spec = learner_spec(preset, seed=seed, **world_options)

    def load(algorithm: str, tensors: dict[str, np.ndarray], manifest: dict[str, Any]):
        recorded = manifest.get("spec")
        world = WorldSpec.from_dict(recorded) if isinstance(recorded, dict) else spec
        return registry.load_policy(algorithm, tensors, manifest, world)

    return load


def catalogue_of(preset: str, seed: int = 0, **world_options: Any) -> tuple[int, ItemFeatures]:
    """The preset's catalogue size and feature lookup (for requests without candidates)."""
    from recloop.producer_sim.presets import make_world

    world = make_world(preset, seed=seed, **world_options)
    return world.catalogue.n_items, world.item_features


def snapshot_root(settings: Settings) -> Path:
    return settings.resolved_snapshot_dir


def _export_slates(topic: str, slates: list[SlateServed]) -> None:
    """Prometheus: slates out, and request-to-slate latency per policy."""
    metrics.RECORDS_OUT.labels("serve", topic).inc(len(slates))
    for slate in slates:
        metrics.SERVING_LATENCY.labels(slate.policy).observe(max(0.0, slate.ts - slate.request_ts))


def _export_swap(published: PolicyPublished, path: Path) -> None:
    """Prometheus: the serving version, its age, and how fresh it was when it went live."""
    metrics.SNAPSHOT_VERSION.labels("serve", published.policy).set(published.version)
    metrics.SNAPSHOT_CREATED.labels("serve", published.policy).set(published.created_ts)
    with contextlib.suppress(Exception):  # freshness is best effort: the manifest is local
        service = describe_snapshot(path).manifest.get("service", {})
        newest = float(service.get("newest_event_ts") or 0.0)
        if newest:
            metrics.MODEL_FRESHNESS.labels(published.policy).set(max(0.0, time.time() - newest))
