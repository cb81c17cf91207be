"""The item catalogue: every item's observable features, one version at a time, for every process.

A catalogue is a float32 matrix ``features_NF`` whose row ``i`` is item ``i`` (ids are
``0 .. N - 1``), a ``version`` and the matrix's ``sha256`` (``digest``). The simulator (or any
catalogue owner) publishes it; serving, the learner and anyone else keep a local copy and look
features up by id, so no record on the wire carries a feature row.

On Kafka (``recloop.core.topics``):

- ``items`` (compacted, one partition) holds ``ItemChunk`` records keyed by ``first_item``:
  rows ``first_item .. first_item + n - 1``, ``chunk_rows(F)`` rows per chunk (the last may
  be shorter). Compaction keeps the newest rows of every chunk, so the topic always holds the
  whole newest catalogue; a world that creates items on the fly publishes the chunks it
  changed (``ItemCatalogue.extended`` + ``chunks(first=...)``) before it names the new items.
- ``catalogue`` (compacted, key ``catalogue``) holds the newest ``CatalogueAnnounced``: version,
  size, width and digest, published only after every chunk of that version was acknowledged.

``CatalogueAssembler`` is the pure fold a follower runs over both topics. Its rules:

1. A chunk is checked before it is kept: its byte length is ``n * dim * 4``, every value is
   finite, and it ends inside ``MAX_CATALOGUE_ITEMS``. A chunk that fails raises
   ``CatalogueRecordError`` with the reason (the consumer dead-letters it) and changes nothing.
2. The newest chunk per ``first_item`` wins (the compacted topic's rule).
3. An announcement newer than the installed version waits until the kept chunks of its width
   cover ``[0, n_items)``; only then is the matrix assembled (never allocated for a hostile
   announcement the chunks do not cover) and hashed. On a digest match it becomes the current
   catalogue; on a mismatch it keeps waiting (chunks of an update may still be in flight).
4. An announcement at or below the installed version is stale and ignored.

A local copy is saved like a snapshot: ``features.safetensors`` plus ``manifest.json``
(version, size, width, digest), loaded only if the digest checks; no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from recloop.core.events import MAX_CATALOGUE_ITEMS, CatalogueAnnounced, ItemChunk

CHUNK_BYTES = 1 << 17
"""Feature bytes per published chunk (128 KiB: about 175 kB of JSON, far under the record
limit), so a 1,000,000-item 32-d catalogue is 977 records."""

FEATURES_FILE = "features.safetensors"
MANIFEST_FILE = "manifest.json"


class CatalogueRecordError(ValueError):
    """An item chunk or announcement that cannot be part of any catalogue (the reason says why)."""


def chunk_rows(feature_dim: int) -> int:
    """Rows per published chunk for a catalogue of ``feature_dim`` features."""
    return max(1, CHUNK_BYTES // (4 * max(feature_dim, 1)))


def digest(features_NF: np.ndarray) -> str:
    """SHA-256 of a feature matrix: its shape, then its float32 little-endian bytes."""
    m = np.ascontiguousarray(features_NF, dtype="<f4")
    h = hashlib.sha256(f"recloop-catalogue:{m.shape[0]}x{m.shape[1]}:".encode())
    h.update(m.data)
    return h.hexdigest()


@dataclass(frozen=True, eq=False)
class ItemCatalogue:
    """Catalogue ``version``: ``features_NF[i]`` are item ``i``'s features (float32, read-only)."""

    features_NF: np.ndarray
    version: int = 1

    def __post_init__(self) -> None:
        m = np.array(self.features_NF, dtype=np.float32, order="C", copy=True)
        if m.ndim != 2 or m.shape[0] < 1:
            raise ValueError(f"a catalogue needs an (N >= 1, F) feature matrix, got {m.shape}")
        if m.shape[0] > MAX_CATALOGUE_ITEMS:
            raise ValueError(f"{m.shape[0]:,} items is over MAX_CATALOGUE_ITEMS")
        if not np.all(np.isfinite(m)):
            raise ValueError("catalogue features contain NaN or infinity")
        if self.version < 1:
            raise ValueError(f"a catalogue version is >= 1, got {self.version}")
        m.setflags(write=False)
        object.__setattr__(self, "features_NF", m)

    @property
    def n_items(self) -> int:
        return int(self.features_NF.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features_NF.shape[1])

    @cached_property
    def sha256(self) -> str:
        return digest(self.features_NF)

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """bool, ``ids.shape``: which ids name an item of this catalogue."""
        ids = np.asarray(ids, dtype=np.int64)
        return (ids >= 0) & (ids < self.n_items)

    def features(self, ids: np.ndarray) -> np.ndarray:
        """Features of ``ids`` (any shape), shape ``ids.shape + (F,)``; an id outside the
        catalogue (padding -1, or unknown) gets a row of zeros."""
        ids = np.asarray(ids, dtype=np.int64)
        known = self.contains(ids)
        rows = self.features_NF[np.where(known, ids, 0)]
        if not known.all():
            rows = rows * known[..., None]
        return rows

    def extended(self, rows_MF: np.ndarray) -> ItemCatalogue:
        """The next version with ``M`` new items ``N .. N + M - 1`` (RecSim-style new documents)."""
        rows_MF = np.asarray(rows_MF, dtype=np.float32).reshape(-1, self.feature_dim)
        return ItemCatalogue(np.concatenate([self.features_NF, rows_MF]), self.version + 1)

    def chunks(self, first: int = 0, ts: float | None = None) -> list[ItemChunk]:
        """The ``items`` records of every chunk holding an item ``>= first`` (all by default)."""
        rows, stamp = chunk_rows(self.feature_dim), time.time() if ts is None else ts
        start = (max(first, 0) // rows) * rows
        out = []
        for lo in range(start, self.n_items, rows):
            block = self.features_NF[lo : lo + rows].astype("<f4", copy=False)
            out.append(ItemChunk(first_item=lo, n=int(block.shape[0]), dim=self.feature_dim,
                                 features=block.tobytes(), ts=stamp))  # fmt: skip
        return out

    def announcement(self, ts: float | None = None) -> CatalogueAnnounced:
        """The ``catalogue`` record of this version."""
        return CatalogueAnnounced(version=self.version, n_items=self.n_items,
                                  feature_dim=self.feature_dim, sha256=self.sha256,
                                  ts=time.time() if ts is None else ts)  # fmt: skip


def chunk_rows_of(chunk: ItemChunk) -> np.ndarray:
    """A chunk's ``(n, dim)`` float32 rows, checked (module rule 1)."""
    if chunk.first_item + chunk.n > MAX_CATALOGUE_ITEMS:
        raise CatalogueRecordError(
            f"chunk at item {chunk.first_item} of {chunk.n} rows ends past MAX_CATALOGUE_ITEMS"
        )
    want = chunk.n * chunk.dim * 4
    if len(chunk.features) != want:
        raise CatalogueRecordError(
            f"chunk at item {chunk.first_item}: {len(chunk.features):,} feature bytes, "
            f"{chunk.n} rows x {chunk.dim} float32 need {want:,}"
        )
    rows = np.frombuffer(chunk.features, dtype="<f4").reshape(chunk.n, chunk.dim)
    if not np.all(np.isfinite(rows)):
        raise CatalogueRecordError(f"chunk at item {chunk.first_item} holds NaN or infinity")
    return rows


@dataclass
class CatalogueAssembler:
    """Folds ``ItemChunk`` and ``CatalogueAnnounced`` records into catalogue versions
    (module docstring, rules 1-4)."""

    current: ItemCatalogue | None = None
    pending: CatalogueAnnounced | None = None
    _chunks: dict[int, np.ndarray] = field(default_factory=dict)
    _dirty: bool = False

    def add_chunk(self, chunk: ItemChunk) -> None:
        """Keep a chunk's rows (raises ``CatalogueRecordError`` for a bad one, keeping nothing)."""
        self._chunks[chunk.first_item] = chunk_rows_of(chunk)
        self._dirty = True

    def announce(self, announcement: CatalogueAnnounced) -> None:
        """Note an announcement; a stale one (rule 4) is dropped."""
        installed = self.current.version if self.current is not None else 0
        waiting = self.pending.version if self.pending is not None else 0
        if announcement.version > installed and announcement.version >= waiting:
            self.pending = announcement
            self._dirty = True

    def install(self) -> ItemCatalogue | None:
        """The pending version if it is now complete and checks (rule 3), else None."""
        ann = self.pending
        if ann is None or not self._dirty:
            return None
        self._dirty = False
        if self.current is not None and ann.version <= self.current.version:
            self.pending = None
            return None
        if not self._covers(ann):
            return None
        matrix = np.zeros((ann.n_items, ann.feature_dim), np.float32)
        for lo in sorted(self._chunks):
            rows = self._chunks[lo]
            if rows.shape[1] == ann.feature_dim and lo < ann.n_items:
                matrix[lo : lo + rows.shape[0]] = rows[: ann.n_items - lo]
        if digest(matrix) != ann.sha256:
            return None
        self.current, self.pending = ItemCatalogue(matrix, ann.version), None
        return self.current

    def _covers(self, ann: CatalogueAnnounced) -> bool:
        reach = 0
        for lo in sorted(self._chunks):
            rows = self._chunks[lo]
            if rows.shape[1] != ann.feature_dim or lo > reach:
                continue
            reach = max(reach, lo + rows.shape[0])
            if reach >= ann.n_items:
                return True
        return reach >= ann.n_items


def save_catalogue(catalogue: ItemCatalogue, directory: Path) -> Path:
    """Write ``features.safetensors`` and ``manifest.json`` into ``directory`` (atomically
    each: written aside, then renamed); returns the directory."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    manifest = {"version": catalogue.version, "n_items": catalogue.n_items,
                "feature_dim": catalogue.feature_dim, "sha256": catalogue.sha256}  # fmt: skip
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".tmp-"))
    try:
        save_file({"features": np.ascontiguousarray(catalogue.features_NF)}, str(tmp / FEATURES_FILE))
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp / FEATURES_FILE, directory / FEATURES_FILE)
        os.replace(tmp / MANIFEST_FILE, directory / MANIFEST_FILE)
    finally:
        for leftover in tmp.iterdir():
            leftover.unlink()
        tmp.rmdir()
    return directory


def load_catalogue(directory: Path) -> ItemCatalogue:
    """The catalogue saved in ``directory``; raises ``CatalogueRecordError`` if the manifest
    is unreadable or the features do not hash to its digest."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        features = load_file(str(directory / FEATURES_FILE))["features"]
        version, sha = int(manifest["version"]), str(manifest["sha256"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise CatalogueRecordError(f"no readable catalogue in {directory}: {exc}") from None
    if digest(features) != sha:
        raise CatalogueRecordError(f"catalogue in {directory} does not match its sha256")
    return ItemCatalogue(features, version)
