"""``recloop bench serve``: request-to-slate latency through Kafka over a 100k-item catalogue.

One run measures, side by side on the same machine and the same faiss index:

- **end to end**: a client produces ``RecRequest``s (no candidate list, so every request
  needs retrieval) to ``rec.requests`` at a fixed rate; the serving service, a separate
  process, answers on ``rec.slates``; latency is the slate's arrival at the client minus
  the request's ``ts``, which includes both Kafka hops, decoding, batching and encoding;
- **compute only**: the same serving core answering the same kind of request in-process,
  one at a time (retrieval, ranking, exploration, building the SlateServed);
- **raw faiss**: one top-M search of the same index, nothing else.

The policy is a dot-product scorer whose item embeddings come in a real snapshot (written,
announced, hash-checked and loaded by the service like any learned policy), so the service
builds its faiss index from the snapshot before the measured phase starts.
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import msgspec
import numpy as np

from recloop.core import codec, snapshot_auth
from recloop.core.events import PolicyPublished, RecRequest
from recloop.core.ports import Slate
from recloop.core.settings import Settings
from recloop.core.snapshot import announced_path, write_snapshot

POLICY = "bench"


@dataclass(frozen=True)
class BenchConfig:
    """What the serving benchmark runs."""

    rate: float = 100.0
    """Requests per second during the measured phase."""
    duration_s: float = 20.0
    """Length of the measured phase."""
    n_items: int = 100_000
    """Catalogue size."""
    dim: int = 32
    """Embedding dimension."""
    k: int = 5
    """Slate size."""
    m: int = 100
    """Candidates retrieved per request."""
    bootstrap: str = ""
    """Kafka bootstrap; empty starts a private local broker for the run."""
    seed: int = 0
    """Seed of the catalogue and the users."""
    index_kind: str = "auto"
    """faiss index kind (``auto`` is exact, IndexFlatIP, at 100k items)."""
    compute_samples: int = 1000
    """Requests timed for the compute-only and raw-faiss figures."""


class DotPolicy:
    """Scores candidates by <user observation, item embedding>; deterministic top-K."""

    name = POLICY

    def __init__(self, embeddings_ND: np.ndarray) -> None:
        self.embeddings_ND = np.ascontiguousarray(embeddings_ND, dtype=np.float32)

    def item_embeddings(self) -> np.ndarray:
        return self.embeddings_ND

    def recommend(self, observation, candidates, k):
        scores_N = self.embeddings_ND[candidates.ids] @ observation.user_obs
        top_K = np.argsort(-scores_N)[:k]
        return Slate(candidates.ids[top_K], scores_N[top_K].astype(np.float64), np.ones(k))


def load_dot_policy(algorithm: str, tensors: dict[str, np.ndarray], manifest: dict) -> DotPolicy:
    return DotPolicy(tensors["item_embeddings_ND"])


def catalogue(n_items: int, dim: int, seed: int) -> np.ndarray:
    """Unit-norm random item embeddings (the same for the same seed, in every process)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7]))
    emb_ND = rng.normal(size=(n_items, dim)).astype(np.float32)
    return emb_ND / np.linalg.norm(emb_ND, axis=1, keepdims=True)


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

    return ServeConfig(
        TrafficSplit.parse([POLICY]), n_items=bench.n_items, retrieve_m=bench.m, seed=bench.seed
    )


# -- the service process ---------------------------------------------------------------------


def serve_main(argv: list[str] | None = None) -> None:
    """Entry of the service subprocess: run until SIGTERM, then print its stats as JSON.

    A plain subprocess rather than multiprocessing: spawn would re-import the parent's
    ``__main__``, which for ``python -m recloop`` runs the CLI again.
    """
    from recloop.services.serve import ServeOptions, ServeService

    settings_kwargs, bench_kwargs = json.loads((argv or sys.argv)[1])
    bench = BenchConfig(**bench_kwargs)
    emb_ND = catalogue(bench.n_items, bench.dim, bench.seed)
    service = ServeService(
        Settings(**settings_kwargs), _config(bench), load_dot_policy,
        item_features=lambda ids: emb_ND[ids], options=ServeOptions(group_id="bench-serve", index_kind=bench.index_kind),
    )  # fmt: skip
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    service.run()
    print(json.dumps(service.snapshot_stats()), flush=True)


def _start_service(settings_kwargs: dict, bench: BenchConfig) -> subprocess.Popen:
    code = "from recloop.bench.serve import serve_main; serve_main()"
    arg = json.dumps([settings_kwargs, asdict(bench)])
    return subprocess.Popen([sys.executable, "-c", code, arg], stdout=subprocess.PIPE, text=True)


def _stop_service(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


# -- the client ------------------------------------------------------------------------------


class _SlateHead(msgspec.Struct):
    """The two fields of a SlateServed the client needs; msgspec skips the rest unparsed,
    so measuring does not compete with the service for CPU by decoding whole slates."""

    request_id: str
    policy_version: int


_head_decoder = msgspec.json.Decoder(_SlateHead)


class _Receiver:
    """Reads slates in a thread, noting each one's arrival time."""

    def __init__(self, settings: Settings) -> None:
        from recloop.kafka.clients import make_consumer

        self.consumer = make_consumer(settings, f"bench-client-{uuid.uuid4().hex[:8]}")
        self.consumer.subscribe([settings.topics.slates])
        self.arrivals: dict[str, tuple[float, int, int]] = {}
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


def _announce(settings: Settings, root: Path, emb_ND: np.ndarray):
    from recloop.kafka.clients import make_producer

    manifest = {"algorithm": "dot", "config": {}, "metrics": {}, "consumed_offsets": {},
                "transitions_applied": 0}  # fmt: skip
    ref = write_snapshot(root, POLICY, 1, {"item_embeddings_ND": emb_ND}, manifest)
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


def _compute_only(bench: BenchConfig, settings: Settings, published: PolicyPublished, emb_ND,
                  obs_UD) -> dict:  # fmt: skip
    """Time the serving core and a raw faiss search of the same index, in this process."""
    from recloop.serving.host import PolicyHost
    from recloop.serving.server import SlateServer
    from recloop.serving.snapshots import SnapshotInstaller

    faiss.omp_set_num_threads(1)  # as the service runs it
    host = PolicyHost([POLICY])
    installer = SnapshotInstaller(host, load_dot_policy, settings.resolved_snapshot_dir,
                                  bench.index_kind, key=settings.snapshot_key)  # fmt: skip
    result = installer.install(published)
    assert result.status == "swapped", result
    server = SlateServer(_config(bench), host, item_features=lambda ids: emb_ND[ids])
    active = host.current(POLICY)
    index = None if active is None else active.index
    if index is None:  # the install above swapped a dot-product policy in, with its index
        raise RuntimeError(f"{POLICY!r} has no catalogue index after {result}")
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
        "index_kind": index.kind,
        "index_load_s": round(result.seconds, 3),
        "compute": _percentiles_ms(compute),
        "encode": _percentiles_ms(encode),
        "faiss": _percentiles_ms(faiss_s),
    }


def run_bench(bench: BenchConfig) -> dict[str, Any]:
    """Run the whole benchmark; returns its figures (the CLI prints them as one JSON line)."""
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
        }
        settings = Settings(**settings_kwargs)
        try:
            create_topics(settings)
            figures = _measure(bench, settings, settings_kwargs, work)
        finally:
            # The figures matter more than tidying up topics.
            with contextlib.suppress(Exception):
                delete_topics(settings, timeout=10)
            if broker is not None:
                broker.stop()
    return figures


def _measure(bench: BenchConfig, settings: Settings, settings_kwargs: dict, work: Path) -> dict:
    from recloop.kafka.clients import make_producer

    emb_ND = catalogue(bench.n_items, bench.dim, bench.seed)
    obs_UD = _users(4096, bench.dim, bench.seed)
    server = _start_service(settings_kwargs, bench)
    receiver = _Receiver(settings)
    producer = make_producer(settings, {"linger.ms": 0})
    try:
        published = _announce(settings, Path(settings_kwargs["snapshot_dir"]), emb_ND)
        _warm_up(bench, settings, producer, receiver, obs_UD)
        count = int(bench.rate * bench.duration_s)
        sent = _send_at_rate(
            producer, settings.topics.requests,
            lambda i: _request(i, "m", obs_UD[i % len(obs_UD)], bench.k), count, bench.rate,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not all(r in receiver.arrivals for r in sent):
            time.sleep(0.05)
        arrivals = dict(receiver.arrivals)
    finally:
        receiver.close()
        service_stats = _stop_service(server)
    latencies = [arrivals[r][0] - ts for r, ts in sent.items() if r in arrivals]
    versions = sorted({arrivals[r][1] for r in sent if r in arrivals})
    sizes = [arrivals[r][2] for r in sent if r in arrivals]
    e2e = _percentiles_ms(latencies)
    local = _compute_only(bench, settings, published, emb_ND, obs_UD)
    return {
        "bench": "serve",
        "cpus": os.cpu_count(),
        "n_items": bench.n_items,
        "dim": bench.dim,
        "k": bench.k,
        "retrieve_m": bench.m,
        "rate_rps": bench.rate,
        "duration_s": bench.duration_s,
        "requests": len(sent),
        "answered": sum(r in arrivals for r in sent),
        "missing": sum(r not in arrivals for r in sent),
        "served_versions": versions,
        "slate_bytes_mean": round(float(np.mean(sizes)), 1) if sizes else 0.0,
        "index_kind": local["index_kind"],
        "index_load_s": local["index_load_s"],
        "e2e_p50_ms": e2e[0],
        "e2e_p99_ms": e2e[1],
        "compute_p50_ms": local["compute"][0],
        "compute_p99_ms": local["compute"][1],
        "encode_p50_ms": local["encode"][0],
        "faiss_p50_ms": local["faiss"][0],
        "faiss_p99_ms": local["faiss"][1],
        "service_compute_ms_per_request": round(
            float(service_stats.get("compute_ms_per_request", float("nan"))), 3
        ),
    }


def _warm_up(bench: BenchConfig, settings: Settings, producer, receiver: _Receiver, obs_UD) -> None:
    """Until the service answers with the snapshot's version, then two seconds at rate."""
    deadline = time.monotonic() + 180
    i = 0
    while time.monotonic() < deadline:
        req = _request(i, "w", obs_UD[i % len(obs_UD)], bench.k)
        producer.produce(
            settings.topics.requests, key=req.user_id.encode(), value=codec.encode(req)
        )
        producer.flush(10)
        time.sleep(0.1)
        i += 1
        if any(v == 1 for _, v, _ in list(receiver.arrivals.values())):
            break
    else:
        raise RuntimeError("the serving process never answered with the snapshot's policy")
    _send_at_rate(
        producer, settings.topics.requests,
        lambda j: _request(j, "x", obs_UD[j % len(obs_UD)], bench.k),
        int(bench.rate * 2), bench.rate,
    )  # fmt: skip
