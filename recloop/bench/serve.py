"""``recloop bench serve``: request-to-slate latency through Kafka over a catalogue of items.

The bench builds its catalogue (``bench_catalogue``: by default the ``large_catalogue`` world's
own, unit vectors in 100 clusters, queried by that world's users' observations; ``random``:
structureless unit vectors and queries) and publishes it on the ``items`` + ``catalogue``
topics like any catalogue owner; the serving service, a
separate process, follows those topics, builds the faiss index of the catalogue's features
(exact or IVF, chosen by size, its recall measured at build) and serves a dot-product
policy whose snapshot has no learned item embeddings, so retrieval runs on that index.
For each catalogue size one run measures, side by side on the same machine:

- **end to end**: a client produces ``RecRequest``s (no candidate list, so every request
  needs retrieval) to ``rec.requests`` at a fixed rate; the service answers on
  ``rec.slates``; latency is the slate's arrival at the client minus the request's ``ts``,
  which includes both Kafka hops, decoding, batching and encoding; and the mean size of a
  slate as it travels (ids only: schema v2). Three measured phases; each figure is the
  median of the three (the per-phase figures are kept beside it);
- **compute only**: the same serving core over an index built the same way, in-process,
  one request at a time (retrieval, ranking, exploration, building the SlateServed);
- **raw faiss**: one top-M search of that index, nothing else;
- **raw Kafka echo**: the same client, broker, topics and rate, with the service replaced by
  a bare confluent-kafka loop in its own process that answers each request with a
  fixed three-field reply (no decoding, no serving): the floor the two Kafka hops set on
  this machine now. ``e2e_over_echo_p50`` / ``_p99`` are the service's figures over it;
- **recall@M**: the share of each bench query's exact top-M (brute force over the whole
  catalogue) that the index returns, on the very queries the phases sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np

from recloop.core import codec, snapshot_auth
from recloop.core.catalogue import ItemCatalogue
from recloop.core.events import PolicyPublished, RecRequest
from recloop.core.ports import Slate
from recloop.core.settings import Settings
from recloop.core.snapshot import announced_path, write_snapshot

POLICY = "bench"
SIZES = (100_000, 1_000_000)
"""Catalogue sizes ``recloop bench serve`` measures by default."""


@dataclass(frozen=True)
class BenchConfig:
    """What the serving benchmark runs (one catalogue size)."""

    rate: float = 100.0
    """Requests per second during each measured phase."""
    duration_s: float = 20.0
    """Length of each measured phase."""
    runs: int = 3
    """Measured phases; each reported figure is their median."""
    n_items: int = 100_000
    """Catalogue size."""
    dim: int = 32
    """Feature dimension of the catalogue."""
    k: int = 5
    """Slate size."""
    m: int = 100
    """Candidates retrieved per request."""
    bootstrap: str = ""
    """Kafka bootstrap; empty starts a private local broker for the run."""
    seed: int = 0
    """Seed of the catalogue and the users."""
    catalogue: str = "world"
    """``world``: the large_catalogue world's clustered items and its users' observations as
    queries; ``random``: unit vectors and queries with no structure."""
    index_kind: str = "auto"
    """faiss index kind (``auto``: exact up to serving.retrieval.EXACT_LIMIT, IVF above)."""
    compute_samples: int = 1000
    """Requests timed for the compute-only and raw-faiss figures."""
    ready_timeout_s: float = 1800.0
    """Longest wait for the service's first answer (publication, assembly, index build)."""
    sweep: tuple[float, ...] = ()
    """Further request rates, one phase of ``duration_s`` each after the measured ones."""


class DotPolicy:
    """Scores candidates by <user observation, catalogue features>; deterministic top-K. It
    has no learned item embeddings, so serving retrieves from the catalogue's own index."""

    name = POLICY

    def recommend(self, observation, candidates, k):
        scores_N = candidates.features_NF @ observation.user_obs
        top_K = np.argsort(-scores_N)[:k]
        return Slate(candidates.ids[top_K], scores_N[top_K].astype(np.float64), np.ones(k))


def load_dot_policy(algorithm: str, tensors: dict[str, np.ndarray], manifest: dict) -> DotPolicy:
    return DotPolicy()


def item_catalogue(n_items: int, dim: int, seed: int) -> ItemCatalogue:
    """Unit-norm random item features (the same for the same seed), as catalogue version 1."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    features_NF = rng.normal(size=(n_items, dim)).astype(np.float32)
    features_NF /= np.linalg.norm(features_NF, axis=1, keepdims=True)
    return ItemCatalogue(features_NF, version=1)


CATALOGUES = ("world", "random")


def bench_catalogue(bench: BenchConfig) -> tuple[ItemCatalogue, np.ndarray]:
    """The catalogue (version 1) and 4,096 unit query vectors the bench sends."""
    if bench.catalogue == "random":
        return item_catalogue(bench.n_items, bench.dim, bench.seed), _users(4096, bench.dim,
                                                                          bench.seed)  # fmt: skip
    if bench.catalogue != "world":
        raise ValueError(f"catalogue {bench.catalogue!r}; choose one of {CATALOGUES}")
    from recloop.producer_sim.presets import large_catalogue

    world = large_catalogue(bench.seed, n_items=bench.n_items, dim=bench.dim)
    rng = np.random.default_rng(np.random.SeedSequence([bench.seed, 9]))
    obs_UD = world.users.observe(world.users.sample(4096, rng)[0]).astype(np.float32)
    obs_UD /= np.linalg.norm(obs_UD, axis=1, keepdims=True)
    return world.item_catalogue, obs_UD


def _users(count: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(np.random.SeedSequence([seed, 8]))
    obs_UD = rng.normal(size=(count, dim)).astype(np.float32)
    return obs_UD / np.linalg.norm(obs_UD, axis=1, keepdims=True)


def _request(i: int, prefix: str, obs_D: np.ndarray, k: int) -> RecRequest:
    return RecRequest(
        request_id=f"{prefix}{i}", user_id=f"user-{i % 997}", session_id=f"s-{i % 997}",
        step=i, ts=time.time(), k=k, observation=obs_D.tolist(),
    )  # fmt: skip


def _config(bench: BenchConfig):
    from recloop.serving.server import ServeConfig
    from recloop.serving.split import TrafficSplit

    return ServeConfig(TrafficSplit.parse([POLICY]), retrieve_m=bench.m, seed=bench.seed)


# -- the service process ---------------------------------------------------------------------


def serve_main(argv: list[str] | None = None) -> None:
    """Entry of the service subprocess: run until SIGTERM, then print its stats as JSON.

    A plain subprocess rather than multiprocessing: spawn would re-import the parent's
    ``__main__``, which for ``python -m recloop`` runs the CLI again. The service knows the
    catalogue only from Kafka.
    """
    from recloop.services.serve import ServeOptions, ServeService

    settings_kwargs, bench_kwargs = json.loads((argv or sys.argv)[1])
    bench = BenchConfig(**bench_kwargs)
    options = ServeOptions(group_id="bench-serve", index_kind=bench.index_kind)
    service = ServeService(Settings(**settings_kwargs), _config(bench), load_dot_policy,
                           options=options)  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    service.run()
    print(json.dumps(service.snapshot_stats()), flush=True)


class _RequestHead(msgspec.Struct):
    request_id: str


def echo_main(argv: list[str] | None = None) -> None:
    """Entry of the raw Kafka echo subprocess: answer every request on ``rec.requests`` with a
    fixed three-field reply on ``rec.slates`` (policy version 0), keyed as the request was, with
    serving's producer and consumer settings; until SIGTERM. Reads from the topic's end."""
    from recloop.kafka.clients import make_consumer, make_producer

    settings_kwargs, _ = json.loads((argv or sys.argv)[1])
    settings = Settings(**settings_kwargs)
    consumer = make_consumer(settings, f"bench-echo-{uuid.uuid4().hex[:8]}",
                             {"auto.offset.reset": "latest"})  # fmt: skip
    consumer.subscribe([settings.topics.requests])
    producer = make_producer(settings, {"linger.ms": 0})
    decode, encode = msgspec.json.Decoder(_RequestHead).decode, msgspec.json.encode
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    while not stop.is_set():
        msg = consumer.poll(0.1)
        if msg is None or msg.error() is not None:
            continue
        head = decode(msg.value() or b"{}")
        reply = {"request_id": head.request_id, "policy_version": 0, "candidates": []}
        producer.produce(settings.topics.slates, key=msg.key(), value=encode(reply))
        producer.poll(0)
    producer.flush(10)
    consumer.close()


def _start_service(settings_kwargs: dict, bench: BenchConfig,
                   entry: str = "serve_main") -> subprocess.Popen:  # fmt: skip
    code = f"from recloop.bench.serve import {entry}; {entry}()"
    arg = json.dumps([settings_kwargs, asdict(bench)])
    return subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, text=True)


def _stop_service(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# -- the client ------------------------------------------------------------------------------


class _SlateHead(msgspec.Struct):
    """The fields of a SlateServed the client needs; msgspec skips the rest unparsed, so
    measuring does not compete with the service for CPU by decoding whole slates."""

    request_id: str
    policy_version: int
    candidates: list[int]


_head_decoder = msgspec.json.Decoder(_SlateHead)


class _Receiver:
    """Reads slates in a thread, noting each one's arrival time, size and candidates."""

    def __init__(self, settings: Settings) -> None:
        from recloop.kafka.clients import make_consumer

        self.consumer = make_consumer(settings, f"bench-client-{uuid.uuid4().hex[:8]}")
        self.consumer.subscribe([settings.topics.slates])
        self.arrivals: dict[str, tuple[float, int, int]] = {}
        self.candidates: dict[str, list[int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            # poll, not consume(n, timeout): consume would hold a slate until n arrived.
            msg = self.consumer.poll(0.1)
            now = time.time()
            value = None if msg is None or msg.error() is not None else msg.value()
            if value is not None:
                head = _head_decoder.decode(value)
                self.arrivals[head.request_id] = (now, head.policy_version, len(value))
                self.candidates[head.request_id] = head.candidates

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.consumer.close()


def _send_at_rate(producer, topic: str, requests_fn, count: int, rate: float) -> dict[str, float]:
    sent: dict[str, float] = {}
    start = time.monotonic()
    for i in range(count):
        time.sleep(max(0.0, start + i / rate - time.monotonic()))
        req = requests_fn(i)
        producer.produce(topic, key=req.user_id.encode(), value=codec.encode(req))
        producer.poll(0)
        sent[req.request_id] = req.ts
    producer.flush(30)
    return sent


def _percentiles_ms(seconds: list[float]) -> tuple[float, float]:
    if not seconds:
        return float("nan"), float("nan")
    ms = 1000.0 * np.asarray(seconds)
    return round(float(np.percentile(ms, 50)), 3), round(float(np.percentile(ms, 99)), 3)


def _publish(settings: Settings, root: Path, catalogue: ItemCatalogue) -> PolicyPublished:
    """The catalogue on items + catalogue, then a snapshot of the policy on policy.snapshots."""
    from recloop.kafka.bus import KafkaBus
    from recloop.kafka.catalogue import publish_catalogue
    from recloop.kafka.clients import make_producer

    publish_catalogue(KafkaBus(settings, process="bench-catalogue"), settings.topics, catalogue,
                      timeout=120)  # fmt: skip
    manifest = {"algorithm": "dot", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": 0}  # fmt: skip
    ref = write_snapshot(root, POLICY, 1, {"bias": np.zeros(1, np.float32)}, manifest)
    # Named relative to the root and signed as the learner does, so the service admits it.
    published = snapshot_auth.sign(PolicyPublished(
        policy=POLICY, algorithm="dot", version=1, path=announced_path(root, ref.path),
        weights_sha256=ref.weights_sha256, manifest_sha256=ref.manifest_sha256,
        created_ts=ref.created_ts,
    ), settings.snapshot_key)  # fmt: skip
    producer = make_producer(settings)
    producer.produce(settings.topics.snapshots, key=POLICY.encode(), value=codec.encode(published))
    producer.flush(30)
    return published


class _LocalIndex:
    """The bench's own copy of what the service builds (same catalogue, kind and M), built in
    a thread while the service builds its own, for the compute-only, faiss and recall figures."""

    def __init__(self, bench: BenchConfig, catalogue: ItemCatalogue) -> None:
        from recloop.serving.items import ServedCatalogue, index_catalogue

        self.served: ServedCatalogue | None = None
        self.error: BaseException | None = None

        def build() -> None:
            try:
                self.served = index_catalogue(catalogue, bench.index_kind, bench.m)
            except BaseException as exc:  # reported by get()
                self.error = exc

        self._thread = threading.Thread(target=build, name="bench-index", daemon=True)
        self._thread.start()

    def get(self):
        self._thread.join()
        if self.error is not None or self.served is None:
            raise RuntimeError(f"the bench's index build failed: {self.error!r}")
        return self.served


def _compute_only(bench: BenchConfig, served, published: PolicyPublished, obs_UD) -> dict:
    """Time the serving core and a raw faiss search of the same index, in this process."""
    from recloop.serving.host import PolicyHost
    from recloop.serving.server import SlateServer

    faiss.omp_set_num_threads(1)  # as the service searches (OpenMP's setting is per thread)
    host = PolicyHost([POLICY])
    host.swap(POLICY, published.version, DotPolicy(), algorithm="dot")
    server = SlateServer(_config(bench), host, catalogue=served)
    index = served.index
    compute, faiss_s, encode = [], [], []
    for i in range(bench.compute_samples):
        req = _request(i, "c", obs_UD[i % len(obs_UD)], bench.k)
        t0 = time.perf_counter()
        (slate,) = server.serve_batch([req])
        t1 = time.perf_counter()
        codec.encode(slate)
        t2 = time.perf_counter()
        index.search(obs_UD[i % len(obs_UD)][None, :], bench.m)
        t3 = time.perf_counter()
        compute.append(t1 - t0)
        encode.append(t2 - t1)
        faiss_s.append(t3 - t2)
    return {
        "compute": _percentiles_ms(compute),
        "encode": _percentiles_ms(encode),
        "faiss": _percentiles_ms(faiss_s),
    }


def _recall(catalogue: ItemCatalogue, served, queries_QD: np.ndarray, m: int) -> float:
    """recall@m of ``served``'s index against brute force on the bench's own queries."""
    from recloop.serving.retrieval import exact_top, recall_of

    found_QM, _ = served.index.search(queries_QD, m)
    return round(recall_of(found_QM, exact_top(catalogue.features_NF, queries_QD, m)), 4)


def run_bench(bench: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark for one catalogue size; returns its figures."""
    from recloop.kafka.admin import create_topics, delete_topics
    from recloop.ops.broker import LocalBroker

    with tempfile.TemporaryDirectory(prefix="recloop-bench-serve-") as tmp:
        work = Path(tmp)
        broker = None
        bootstrap = bench.bootstrap
        if not bootstrap:
            broker = LocalBroker(work / "kafka", die_with_parent=True)
            broker.start()
            bootstrap = broker.bootstrap
        settings_kwargs: dict[str, Any] = {
            "kafka_bootstrap": bootstrap,
            "topic_prefix": f"bench-serve-{uuid.uuid4().hex[:8]}.",
            "home": str(work),
            "snapshot_dir": str(work / "snapshots"),
            "catalogue_wait_s": bench.ready_timeout_s,
        }
        settings = Settings(**settings_kwargs)
        try:
            create_topics(settings)
            figures = _measure(bench, settings, settings_kwargs)
        finally:
            # The figures matter more than tidying up topics.
            with contextlib.suppress(Exception):
                delete_topics(settings, timeout=10)
            if broker is not None:
                broker.stop()
    return figures


def run_sizes(
    bench: BenchConfig,
    sizes: tuple[int, ...] = SIZES,
    on_size: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """``run_bench`` for every catalogue size (``on_size`` sees each as it ends); the CLI
    prints the result as one JSON line."""
    figures = []
    for n in sizes:
        figures.append(run_bench(replace(bench, n_items=n)))
        if on_size is not None:
            on_size(figures[-1])
    return {"bench": "serve", "sizes": figures}


def _phase(bench: BenchConfig, settings: Settings, producer, receiver: _Receiver, obs_UD,
           run: int, prefix: str = "m") -> dict[str, Any]:  # fmt: skip
    count = int(bench.rate * bench.duration_s)
    offset = run * count
    sent = _send_at_rate(
        producer, settings.topics.requests,
        lambda i: _request(i, f"{prefix}{run}-", obs_UD[(offset + i) % len(obs_UD)], bench.k),
        count, bench.rate,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(r in receiver.arrivals for r in sent):
        time.sleep(0.05)
    arrivals = dict(receiver.arrivals)
    latencies = [arrivals[r][0] - ts for r, ts in sent.items() if r in arrivals]
    sizes = [arrivals[r][2] for r in sent if r in arrivals]
    candidates = [len(receiver.candidates[r]) for r in sent if r in arrivals]
    p50, p99 = _percentiles_ms(latencies)
    return {
        "requests": len(sent),
        "answered": sum(r in arrivals for r in sent),
        "served_versions": sorted({arrivals[r][1] for r in sent if r in arrivals}),
        "e2e_p50_ms": p50,
        "e2e_p99_ms": p99,
        "slate_bytes_mean": round(float(np.mean(sizes)), 1) if sizes else 0.0,
        "candidates_mean": round(float(np.mean(candidates)), 1) if candidates else 0.0,
    }


def _median(phases: list[dict[str, Any]], key: str) -> float:
    return round(float(np.median([p[key] for p in phases])), 3)


def _measure(bench: BenchConfig, settings: Settings, settings_kwargs: dict) -> dict:
    from recloop.kafka.clients import make_producer

    catalogue, obs_UD = bench_catalogue(bench)
    t0 = time.monotonic()
    published = _publish(settings, Path(settings_kwargs["snapshot_dir"]), catalogue)
    publish_s = time.monotonic() - t0
    server = _start_service(settings_kwargs, bench)
    local = _LocalIndex(bench, catalogue)
    receiver = _Receiver(settings)
    producer = make_producer(settings, {"linger.ms": 0})
    phases: list[dict[str, Any]] = []
    sweep: list[dict[str, Any]] = []
    echoes: list[dict[str, Any]] = []
    try:
        try:
            ready_s = _warm_up(bench, settings, producer, receiver, obs_UD)
            served = local.get()  # built by now or soon: not while a phase is measured
            for run in range(bench.runs):
                phases.append(_phase(bench, settings, producer, receiver, obs_UD, run))
            sweep += [{"rate_rps": rate, **_phase(replace(bench, rate=rate), settings,
                                                 producer, receiver, obs_UD, bench.runs + i)}
                     for i, rate in enumerate(bench.sweep)]  # fmt: skip
        finally:
            service_stats = _stop_service(server)
        echo = _start_service(settings_kwargs, bench, entry="echo_main")
        try:
            _warm_up(bench, settings, producer, receiver, obs_UD, version=0, prefix="e")
            for run in range(bench.runs):
                echoes.append(_phase(bench, settings, producer, receiver, obs_UD,
                                     run, prefix="echo"))  # fmt: skip
        finally:
            _stop_service(echo)
    finally:
        receiver.close()
    timed = _compute_only(bench, served, published, obs_UD)
    count = int(bench.rate * bench.duration_s)
    sent_QD = obs_UD[: min(len(obs_UD), count * bench.runs)]
    service_catalogue = service_stats.get("catalogue") or {}
    keys = ("e2e_p50_ms", "e2e_p99_ms")
    e2e = {key: _median(phases, key) for key in keys}
    echo_ms = {key: _median(echoes, key) for key in keys}
    return {
        "bench": "serve",
        "cpus": os.cpu_count(),
        "n_items": bench.n_items,
        "catalogue": bench.catalogue,
        "dim": bench.dim,
        "k": bench.k,
        "retrieve_m": bench.m,
        "rate_rps": bench.rate,
        "duration_s": bench.duration_s,
        "runs": bench.runs,
        "requests": sum(p["requests"] for p in phases),
        "answered": sum(p["answered"] for p in phases),
        "missing": sum(p["requests"] - p["answered"] for p in phases),
        "served_versions": sorted({v for p in phases for v in p["served_versions"]}),
        "slate_bytes_mean": _median(phases, "slate_bytes_mean"),
        "candidates_mean": _median(phases, "candidates_mean"),
        "e2e_p50_ms": e2e["e2e_p50_ms"],
        "e2e_p99_ms": e2e["e2e_p99_ms"],
        "e2e_p99_ms_runs": [p["e2e_p99_ms"] for p in phases],
        "echo_p50_ms": echo_ms["e2e_p50_ms"],
        "echo_p99_ms": echo_ms["e2e_p99_ms"],
        "echo_p99_ms_runs": [p["e2e_p99_ms"] for p in echoes],
        "e2e_over_echo_p50": round(e2e["e2e_p50_ms"] / echo_ms["e2e_p50_ms"], 2),
        "e2e_over_echo_p99": round(e2e["e2e_p99_ms"] / echo_ms["e2e_p99_ms"], 2),
        "sweep": [{k: p[k] for k in ("rate_rps", "answered", "requests", "e2e_p50_ms",
                                     "e2e_p99_ms")} for p in sweep],  # fmt: skip
        "compute_p50_ms": timed["compute"][0],
        "compute_p99_ms": timed["compute"][1],
        "encode_p50_ms": timed["encode"][0],
        "faiss_p50_ms": timed["faiss"][0],
        "faiss_p99_ms": timed["faiss"][1],
        "index": served.index.report(),
        f"recall_at_{bench.m}": _recall(catalogue, served, sent_QD, bench.m),
        "service_index": service_catalogue.get("index"),
        "catalogue_publish_s": round(publish_s, 1),
        "service_ready_s": round(ready_s, 1),
        "service_compute_ms_per_request": round(
            float(service_stats.get("compute_ms_per_request", float("nan"))), 3
        ),
    }


def _warm_up(bench: BenchConfig, settings: Settings, producer, receiver: _Receiver,
             obs_UD, version: int = 1, prefix: str = "") -> float:  # fmt: skip
    """Until the service answers with the snapshot's version (it has followed the catalogue
    and built its index by then; the echo answers with version 0), then two seconds at rate;
    returns seconds to the first."""
    start = time.monotonic()
    i = 0
    while time.monotonic() - start < bench.ready_timeout_s:
        req = _request(i, f"{prefix}w", obs_UD[i % len(obs_UD)], bench.k)
        producer.produce(
            settings.topics.requests, key=req.user_id.encode(), value=codec.encode(req)
        )
        producer.flush(10)
        time.sleep(0.5)
        i += 1
        if any(r.startswith(f"{prefix}w") and v == version
               for r, (_, v, _) in list(receiver.arrivals.items())):  # fmt: skip
            break
    else:
        who = "the raw echo process" if version == 0 else "the serving process"
        raise RuntimeError(f"{who} never answered with policy version {version}")
    ready_s = time.monotonic() - start
    _send_at_rate(
        producer, settings.topics.requests,
        lambda j: _request(j, f"{prefix}x", obs_UD[j % len(obs_UD)], bench.k),
        int(bench.rate * 2), bench.rate,
    )  # fmt: skip
    return ready_s
