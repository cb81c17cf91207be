"""The item catalogue: versions, chunks, the assembler's rules, the local copy, the follower."""

from __future__ import annotations

import json

import msgspec
import numpy as np
import pytest

from recloop.core import codec
from recloop.core.catalogue import (
    CHUNK_BYTES,
    CatalogueAssembler,
    CatalogueRecordError,
    ItemCatalogue,
    chunk_rows,
    digest,
    load_catalogue,
    save_catalogue,
)
from recloop.core.dlq import HEADER_ERROR
from recloop.core.events import CatalogueAnnounced, ItemChunk
from recloop.core.membus import MemoryBus
from recloop.core.topics import Topics
from recloop.kafka.catalogue import CatalogueFollower, NoCatalogue, publish_catalogue


def _catalogue(n: int = 3000, f: int = 20, seed: int = 0, version: int = 1) -> ItemCatalogue:
    rng = np.random.default_rng(seed)
    return ItemCatalogue(rng.normal(size=(n, f)).astype(np.float32), version)


def _wire(record):
    """Through the wire format and back, as a consumer sees it."""
    return codec.decode(codec.encode(record), type(record))


def test_features_by_id_with_padding_and_unknown_ids_as_zeros():
    cat = _catalogue(10, 4)
    ids = np.array([[3, -1], [12, 0]])
    got = cat.features(ids)
    assert got.shape == (2, 2, 4)
    np.testing.assert_array_equal(got[0, 0], cat.features_NF[3])
    np.testing.assert_array_equal(got[1, 1], cat.features_NF[0])
    assert not got[0, 1].any() and not got[1, 0].any()
    assert cat.contains(ids).tolist() == [[True, False], [False, True]]


def test_catalogue_is_immutable_and_refuses_bad_matrices():
    cat = _catalogue(5, 2)
    with pytest.raises(ValueError):
        cat.features_NF[0, 0] = 1.0
    with pytest.raises(ValueError, match="NaN"):
        ItemCatalogue(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="N >= 1"):
        ItemCatalogue(np.zeros((0, 3)))


def test_digest_depends_on_shape_and_values():
    m = np.arange(12, dtype=np.float32)
    assert digest(m.reshape(3, 4)) != digest(m.reshape(4, 3))
    bumped = m.copy()
    bumped[5] += 1e-6
    assert digest(m.reshape(3, 4)) != digest(bumped.reshape(3, 4))


def test_chunks_fit_the_record_limit_and_cover_the_catalogue():
    cat = _catalogue(10_000, 32)
    chunks = cat.chunks()
    assert sum(c.n for c in chunks) == 10_000
    assert all(c.n == chunk_rows(32) for c in chunks[:-1])
    assert all(len(c.features) <= CHUNK_BYTES for c in chunks)
    assert max(len(codec.encode(c)) for c in chunks) < 200_000


def test_assembler_installs_only_a_complete_version_that_checks():
    cat = _catalogue()
    asm = CatalogueAssembler()
    asm.announce(_wire(cat.announcement()))
    chunks = [_wire(c) for c in cat.chunks()]
    for chunk in chunks[:-1]:
        asm.add_chunk(chunk)
    assert asm.install() is None  # the last chunk is missing
    asm.add_chunk(chunks[-1])
    got = asm.install()
    assert got is not None and got.version == 1 and got.sha256 == cat.sha256
    np.testing.assert_array_equal(got.features_NF, cat.features_NF)


def test_assembler_waits_on_a_digest_mismatch_until_the_update_arrives():
    old = _catalogue()
    rows = old.features_NF.copy()
    rows[7] += 1.0
    new = ItemCatalogue(rows, version=2)
    asm = CatalogueAssembler()
    for chunk in old.chunks():
        asm.add_chunk(chunk)
    asm.announce(old.announcement())
    assert asm.install().version == 1
    asm.announce(new.announcement())  # announced before its changed chunk arrived
    assert asm.install() is None and asm.current.version == 1
    asm.add_chunk(new.chunks()[0])
    assert asm.install().sha256 == new.sha256


def test_new_items_are_registered_by_publishing_the_chunks_that_changed():
    cat = _catalogue(10_000, 8)  # three chunks of 4,096 rows
    grown = cat.extended(np.ones((5, 8), np.float32))
    assert grown.n_items == 10_005 and grown.version == 2
    asm = CatalogueAssembler()
    for chunk in cat.chunks():
        asm.add_chunk(chunk)
    asm.announce(cat.announcement())
    asm.install()
    changed = grown.chunks(first=10_000)
    assert [c.first_item for c in changed] == [8192]
    for chunk in changed:
        asm.add_chunk(chunk)
    asm.announce(grown.announcement())
    assert asm.install().n_items == 10_005
    np.testing.assert_array_equal(asm.current.features(np.array([10_004])), np.ones((1, 8)))


def test_a_stale_announcement_is_ignored():
    cat = _catalogue(100, 2, version=3)
    asm = CatalogueAssembler()
    for chunk in cat.chunks():
        asm.add_chunk(chunk)
    asm.announce(cat.announcement())
    asm.install()
    old = _catalogue(100, 2, seed=1, version=2)
    asm.announce(old.announcement())
    assert asm.pending is None and asm.install() is None and asm.current.version == 3


@pytest.mark.parametrize(
    ("chunk", "reason"),
    [
        (ItemChunk(first_item=0, n=2, dim=2, features=b"\x00" * 12), "need 16"),
        (ItemChunk(first_item=0, n=1, dim=1, features=np.float32([np.nan]).tobytes()), "NaN"),
        (ItemChunk(first_item=99_999_999, n=2, dim=0, features=b""), "MAX_CATALOGUE_ITEMS"),
    ],
)
def test_a_bad_chunk_is_refused_with_its_reason_and_changes_nothing(chunk, reason):
    asm = CatalogueAssembler()
    with pytest.raises(CatalogueRecordError, match=reason):
        asm.add_chunk(chunk)
    assert not asm._chunks


def test_a_hostile_announcement_allocates_nothing_it_is_not_covered_by():
    asm = CatalogueAssembler()
    asm.add_chunk(_catalogue(10, 4).chunks()[0])
    asm.announce(CatalogueAnnounced(version=1, n_items=90_000_000, feature_dim=1024,
                                    sha256="0" * 64))  # fmt: skip
    assert asm.install() is None  # would be 368 GB: never assembled


def test_an_announcement_with_a_bad_digest_field_does_not_decode():
    raw = codec.encode(_catalogue(3, 1).announcement()).replace(b'"sha256":"', b'"sha256":"x')
    with pytest.raises(codec.RecordDecodeError):
        codec.decode(raw, CatalogueAnnounced)


def test_local_copy_round_trips_and_is_checked(tmp_path):
    cat = _catalogue(50, 3, version=4)
    save_catalogue(cat, tmp_path)
    back = load_catalogue(tmp_path)
    assert back.version == 4 and back.sha256 == cat.sha256
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["sha256"] = "f" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CatalogueRecordError, match="sha256"):
        load_catalogue(tmp_path)
    with pytest.raises(CatalogueRecordError, match="no readable catalogue"):
        load_catalogue(tmp_path / "missing")


def test_follower_joins_late_and_dead_letters_bad_item_records():
    bus, topics = MemoryBus(), Topics()
    cat = _catalogue()
    assert publish_catalogue(bus, topics, cat) == len(cat.chunks())
    bad_length = msgspec.structs.replace(cat.chunks()[0], features=b"\x00" * 8)
    bus.publish(topics.items, b"0", codec.encode(bad_length))
    bus.publish(topics.items, b"1", b"not json")
    follower = CatalogueFollower(bus, topics, "test")
    seen = []
    follower.on_version.append(seen.append)
    got = follower.wait(5.0)
    assert got.sha256 == cat.sha256 and seen == [got]
    follower.poll(timeout=0.1)
    assert follower.refused == 1
    dlq = bus.subscribe([topics.dlq(topics.items)], "dlq-check").poll(10, 0.1)
    reasons = sorted(dict(m.headers).get(HEADER_ERROR, b"").decode() for m in dlq)
    assert len(dlq) == 2 and any("need" in r for r in reasons), reasons
    follower.close()


def test_follower_without_a_catalogue_says_what_to_start():
    follower = CatalogueFollower(MemoryBus(), Topics(), "test")
    with pytest.raises(NoCatalogue, match="recloop sim.*RECLOOP_CATALOGUE_WAIT_S"):
        follower.wait(0.3)
