"""``recloop serve``'s process shell: requests in over a ``Bus``, the pure core, slates out.

``step()`` is one round, and the in-process loop drives it: read what ``session.state``,
``policy.snapshots``, ``items`` and ``catalogue`` have (into the session cache, the pending
announcements and the ``CatalogueFollower``), index a newly completed catalogue version
(``serving.items.CatalogueSwap``), install the newest pending snapshot that verifies
(``serve_installs``: a refused one is counted and the newest older one above what serves
is tried), then answer a batch of ``rec.requests`` with ``serving.server.SlateServer`` and
publish one ``SlateServed`` per request on ``rec.slates``. Request offsets are committed
only after the slates before them were acknowledged, so a crash answers a request twice,
never zero times. Requests that decode
but cannot be answered (k above the candidates, duplicate candidates, ...) are
dead-lettered by the ``Reader``, re-encoded, with the same headers; so is an item chunk
the catalogue assembler refuses. No request is read before a catalogue is serving: the
catalogue is the only source of item ids and features (serving never builds a world).

``run()`` (the process on Kafka) first warms up (``warm_up``: a complete catalogue is
indexed, waiting at most ``Settings.catalogue_wait_s``, and the announced snapshots are
installed before the first request is read, so a restart never serves an older version),
then runs the same rounds without their side duties, which get a thread each so none waits
for another: the side loop reads the whole ``session.state`` changelog,
``policy.snapshots``, ``items`` and ``catalogue`` (a group of its own, from the beginning,
never committing: every replica needs all of them); the installer loop verifies, loads and
indexes announced snapshots, and the indexing loop builds each new catalogue version's
index, both off the request path, so a swap never stalls or drops a request. A broker
outage is waited out: the commit's flush waits for the broker (``kafka.clients``),
transient errors are noted and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import faiss

from recloop import metrics
from recloop.core import codec
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import (
    CatalogueAnnounced,
    ItemChunk,
    PolicyPublished,
    RecRequest,
    SessionState,
)
from recloop.core.ports import Bus
from recloop.core.settings import Settings
from recloop.kafka.catalogue import CatalogueFollower, NoCatalogue
from recloop.kafka.deadletter import Consumed, Reader, fatal
from recloop.services.serve_installs import Installs
from recloop.services.serve_settings import ServeOptions, ServeStats
from recloop.serving.fallback import PopularityCounts
from recloop.serving.host import PolicyHost
from recloop.serving.items import CatalogueSwap
from recloop.serving.server import ServeConfig, SlateServer, validate_request
from recloop.serving.session_cache import SessionCache
from recloop.serving.snapshots import PolicyLoader, SnapshotInstaller

__all__ = ["NoCatalogue", "ServeOptions", "ServeService", "ServeStats"]

log = logging.getLogger(__name__)


class ServeService:
    """Wire settings, the serving core and a bus; ``step`` a round or ``run`` until stopped.

    ``installer`` (with the ``host`` it installs into) replaces the snapshot installer: the
    in-process loop installs live policies. ``catalogue``, if given, serves until a newer
    version arrives on ``items`` + ``catalogue`` (the service follows those topics always).
    """

    def __init__(
        self,
        settings: Settings,
        config: ServeConfig,
        loader: PolicyLoader | None = None,
        *,
        catalogue: ItemCatalogue | None = None,
        options: ServeOptions | None = None,
        bus: Bus | None = None,
        installer: Any = None,
        host: PolicyHost | None = None,
    ) -> None:
        self.settings, self.topics = settings, settings.topics
        self.options = options or ServeOptions()
        faiss.omp_set_num_threads(self.options.faiss_threads)
        self.host = host or PolicyHost(config.learned_policies)
        self.cache = SessionCache(PopularityCounts())
        self.server = SlateServer(config, self.host, self.cache)
        self.catalogues = CatalogueSwap(self.server.set_catalogue, self.options.index_kind,
                                        config.retrieve_m)  # fmt: skip
        if catalogue is not None:
            self.catalogues.offer(catalogue)
            self.catalogues.build_pending()
        if installer is None:
            if loader is None:
                raise ValueError("a snapshot loader is needed unless an installer is given")
            installer = SnapshotInstaller(
                self.host, loader, settings.resolved_snapshot_dir, self.options.index_kind,
                key=settings.snapshot_key, max_weights_bytes=settings.snapshot_max_weights_bytes,
                recall_m=config.retrieve_m,
            )  # fmt: skip
        self.installer = installer
        self.stats = ServeStats()
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._errors: deque[str] = deque(maxlen=20)
        self.installs = Installs(self.installer, self.stats.installs, self._errors)
        if bus is None:
            from recloop.kafka.bus import KafkaBus

            # No linger: a slate goes out the moment it is made (a batch's slates are
            # produced together anyway); 1 ms of linger cost 1 ms at p50 and 4 at p99.
            bus = KafkaBus(settings, {"linger.ms": 0}, process="serve")
        self.bus = bus
        self.follower = CatalogueFollower(bus, self.topics, self.options.name)
        self._requests: Reader | None = None
        self._side: Reader | None = None
        self._last_commit = time.monotonic()

    # -- one round ---------------------------------------------------------------------------

    def step(self, timeout: float = 0.0, side: bool = True) -> int:
        """Side duties (if ``side``), then one batch of requests; returns requests handled.
        Before a catalogue serves, no request is read (they wait on the topic)."""
        if side:
            self.poll_side(timeout=0.0)
            self.catalogues.build_pending()
            self.install_pending()
        if self.server.served is None:
            self.stats.waiting_for_catalogue += 1
            self.bus.serve()
            return 0
        requests = self.requests
        batch = self._next_batch(requests, timeout)
        if not self.ready.is_set() and requests.consumer.assigned():
            self.ready.set()
        if batch:
            self._answer(batch, requests)
        self.bus.serve()
        if time.monotonic() - self._last_commit >= self.options.commit_every_s:
            self._confirm_and_commit()
        return len(batch)

    @property
    def group_id(self) -> str:
        """The request loop's consumer group, under the deployment's prefix."""
        return self.topics.group(self.options.group_id)

    @property
    def requests(self) -> Reader:
        if self._requests is None:
            self._requests = Reader(self.bus, self.topics, ["rec.requests"],
                                    self.group_id, self.options.name)  # fmt: skip
        return self._requests

    def poll_side(self, timeout: float) -> None:
        """Read session states into the cache, announcements into the pending set and the
        catalogue's records into the follower; a completed catalogue version is offered for
        indexing."""
        if self._side is None:
            group = f"{self.group_id}-side-{uuid.uuid4().hex[:12]}"
            topics = ["session.state", "policy.snapshots", "items", "catalogue"]
            self._side = Reader(self.bus, self.topics, topics, group,
                                f"{self.options.name}-side")  # fmt: skip
        for item in self._side.poll_batch(1000, timeout=timeout):
            record = item.value
            if isinstance(record, SessionState):
                self.cache.update(record)
            elif isinstance(record, PolicyPublished):
                self.installs.announce(record)
            elif isinstance(record, ItemChunk | CatalogueAnnounced):
                self.follower.handle(item, self._side)
        new = self.follower.install()
        if new is not None:
            self.catalogues.offer(new)

    def install_pending(self) -> None:
        """Install every pending announcement (newest per policy), in this thread."""
        self.installs.install_pending()

    def warm_up(self, timeout_s: float, build_here: bool = True) -> bool:
        """Before the first request: read ``policy.snapshots``, ``session.state`` and the
        catalogue to their ends, index the catalogue and install the newest snapshots, so a
        restarted server answers with the versions it served before, never with the fallback
        of a cold start (served versions never go backwards). Catching up is bounded by
        ``timeout_s``; a complete catalogue is waited for up to ``Settings.catalogue_wait_s``
        (without one ``NoCatalogue`` is raised, its message saying what to start), then its
        index build is waited out (a failed build raises ``NoCatalogue`` with the reason).
        ``build_here=False`` leaves the build to the indexing thread (``run``), so the side
        reader keeps polling its group while a large index builds. Returns whether it
        caught up."""
        start = time.monotonic()
        self.poll_side(timeout=0.0)
        assert self._side is not None
        caught_up = False
        while not self._stop.is_set():
            self.poll_side(timeout=0.1)
            if build_here:
                self.catalogues.build_pending()
            caught_up = caught_up or self._side.consumer.caught_up()
            waited = time.monotonic() - start
            if self.server.served is not None and (caught_up or waited >= timeout_s):
                break
            if self.follower.current is None:
                if waited >= self.settings.catalogue_wait_s:
                    raise NoCatalogue(self._no_catalogue(waited))
            elif not self.catalogues.pending and self.server.served is None:
                errors = list(self.catalogues.errors)
                raise NoCatalogue(f"serve: the catalogue's index was not built: "
                                  f"{errors[-1] if errors else 'no reason given'}")  # fmt: skip
        if not caught_up:
            why = "no partitions yet" if not self._side.consumer.assigned() else "still behind"
            log.warning("serve: not caught up with %s within %.0f s (%s); serving anyway",
                        self.topics.snapshots, timeout_s, why)  # fmt: skip
            self._errors.append(f"warm-up: not caught up within {timeout_s:.0f} s ({why})")
        self.install_pending()
        return caught_up

    def _no_catalogue(self, waited: float) -> str:
        return (f"serve: no complete catalogue on {self.topics.items} + {self.topics.catalogue} "
                f"within {waited:.0f} s (RECLOOP_CATALOGUE_WAIT_S): start `recloop sim` (it "
                f"publishes its world's catalogue) or `recloop catalogue publish` first, or "
                f"raise RECLOOP_CATALOGUE_WAIT_S")  # fmt: skip

    # -- lifecycle ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask every loop to finish (safe from a signal handler)."""
        self._stop.set()
        self.installs.wake()
        self.catalogues.wake()

    def run(
        self,
        max_seconds: float | None = None,
        on_tick: Callable[[dict[str, Any]], None] | None = None,
        tick_every_s: float = 5.0,
    ) -> ServeStats:
        """Serve until ``stop()`` (or ``max_seconds``); returns the final stats."""
        # OpenMP's thread count is per calling thread: set it in the one that searches.
        faiss.omp_set_num_threads(self.options.faiss_threads)
        side = threading.Thread(target=self._side_loop, name="serve-side", daemon=True)
        installer = threading.Thread(target=self.installs.run_until, args=(self._stop,),
                                     name="serve-install", daemon=True)  # fmt: skip
        indexer = threading.Thread(target=self.catalogues.run_until, args=(self._stop,),
                                   name="serve-index", daemon=True)  # fmt: skip
        indexer.start()
        try:
            self.warm_up(self.options.warm_up_s, build_here=False)
        except NoCatalogue:
            self.stop()  # nothing can be answered without one; the message says what to start
            indexer.join(timeout=60)
            raise
        except Exception as exc:
            if fatal(exc):
                raise
            self._errors.append(f"warm-up: {exc}")  # serve anyway; the side loop catches up
        requests = self.requests
        side.start()
        installer.start()
        start = last_tick = time.monotonic()
        try:
            while not self._stop.is_set():
                if max_seconds is not None and time.monotonic() - start >= max_seconds:
                    break
                try:
                    self.step(self.options.poll_timeout_s, side=False)
                except Exception as exc:
                    if fatal(exc):
                        raise
                    # Transient broker trouble (a leader moving, a reconnect): note it, go on.
                    self._errors.append(f"poll: {exc}")
                    time.sleep(0.1)
                if on_tick is not None and time.monotonic() - last_tick >= tick_every_s:
                    on_tick(self.snapshot_stats())
                    last_tick = time.monotonic()
        finally:
            self.stop()
            try:
                self._confirm_and_commit()
            finally:
                requests.close()
                side.join(timeout=10)
                installer.join(timeout=30)
                indexer.join(timeout=60)
        return self.stats

    # -- the request path --------------------------------------------------------------------

    def _next_batch(self, consumer: Reader, timeout: float) -> list[Consumed]:
        """Whatever requests are buffered, up to a batch; if none, wait for the first one.

        ``consume(n, timeout)`` waits until it has n messages or the timeout passes, which
        would hold a lone request for the whole timeout. Asking for what is already there,
        and otherwise for just one, answers as soon as a request arrives and still batches
        under load.
        """
        size = self.options.batch_size
        batch = consumer.poll_batch(size, timeout=0)
        if batch or timeout <= 0:
            return batch
        batch = consumer.poll_batch(1, timeout=timeout)
        if batch and size > 1:
            batch += consumer.poll_batch(size - 1, timeout=0)
        return batch

    def _answer(self, batch: list[Consumed], consumer: Reader) -> None:
        # One catalogue version for the whole batch: validated against and served from it.
        served = self.server.served
        catalogue = None if served is None else served.catalogue
        valid: list[RecRequest] = []
        for item in batch:
            request = item.value
            assert isinstance(request, RecRequest)
            problem = validate_request(request, catalogue)
            if problem is None:
                valid.append(request)
            else:
                consumer.dead_letter(item, f"unanswerable request: {problem}")
                self.stats.invalid += 1
        t0 = time.perf_counter()
        slates = self.server.serve_batch(valid, served)
        self.stats.compute_s += time.perf_counter() - t0
        for slate in slates:
            self.bus.publish(self.topics.slates, slate.user_id.encode(), codec.encode(slate))
        metrics.export_slates(self.topics.slates, slates)
        self.stats.requests += len(batch)
        self.stats.slates += len(slates)
        self.stats.batches += 1

    def _confirm_and_commit(self) -> None:
        # Every slate (and dead letter) before these offsets must be on the broker first.
        self._last_commit = time.monotonic()
        if self._requests is None:
            return
        self.bus.flush()
        try:
            self._requests.commit()
        except Exception as exc:
            if fatal(exc):
                raise
            # A rebalance can reject the commit; the requests will be answered again, not lost.
            self._errors.append(f"commit: {exc}")

    # -- session state and announcements -----------------------------------------------------

    def _side_loop(self) -> None:
        # Also the catalogue's records: a new version is indexed by the indexing thread.
        try:
            while not self._stop.is_set():
                self.poll_side(timeout=0.1)
        except Exception as exc:  # keep serving on the last known state; say why
            self._errors.append(f"side loop stopped: {type(exc).__name__}: {exc}")
            log.exception("session-state/snapshot consumer stopped")
        finally:
            if self._side is not None:
                self._side.close()

    # -- reporting ---------------------------------------------------------------------------

    def snapshot_stats(self) -> dict[str, Any]:
        """A JSON-able view of the counters."""
        versions = {name: self.host.version(name) for name in self.host.names}
        served = self.server.served
        catalogue: dict[str, Any] | None = None
        if served is not None:
            index = None if served.index is None else served.index.report()
            catalogue = {"version": served.version, "n_items": served.n_items,
                         "feature_dim": served.catalogue.feature_dim, "index": index}  # fmt: skip
        indexes = {}
        for name in self.host.names:
            active = self.host.current(name)
            if active is not None and active.index is not None:
                indexes[name] = active.index.report()
        return {
            "catalogue": catalogue,
            "learned_indexes": indexes,
            "catalogue_swaps": self.catalogues.swaps,
            "catalogue_chunks_refused": self.follower.refused,
            "requests": self.stats.requests,
            "slates": self.stats.slates,
            "invalid": self.stats.invalid,
            "undecodable": (self._requests.stats.dead_lettered - self.stats.invalid
                            if self._requests else 0),
            "sessions_cached": len(self.cache),
            "versions": versions,
            "installs": dict(self.installer.counts),
            "last_refusal": self.installer.last_refusal,
            "policy_errors": self.server.stats.get("policy_errors", 0),
            "compute_ms_per_request": 1000 * self.stats.compute_s / max(self.stats.slates, 1),
            "errors": list(self._errors) + list(self.catalogues.errors),
        }
