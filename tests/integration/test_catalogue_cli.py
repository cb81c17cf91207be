"""``recloop catalogue publish | show | export`` against a real broker, run as an operator would.

A deployment with its own items saves them as a local copy, publishes it, and every process
(here: ``show``, a fresh follower) reads the same version and digest back from the compacted
topics; publishing the same copy again goes out as the next version, so followers take it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from recloop.core.catalogue import ItemCatalogue, load_catalogue, save_catalogue
from recloop.core.settings import Settings

pytestmark = pytest.mark.integration


def _recloop(settings: Settings, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECLOOP_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
           "RECLOOP_TOPIC_PREFIX": settings.topic_prefix, "RECLOOP_HOME": str(settings.home)}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "recloop", "catalogue", *args], env=env,
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_publish_show_export_round_trip(kafka_settings: Settings, tmp_path: Path):
    rng = np.random.default_rng(3)
    own = ItemCatalogue(rng.normal(size=(20_000, 16)).astype(np.float32), version=1)
    save_catalogue(own, tmp_path / "mine")

    first = _recloop(kafka_settings, "publish", str(tmp_path / "mine"))
    assert first.returncode == 0, first.stderr
    published = json.loads(first.stdout.strip().splitlines()[-1])
    assert published == {"version": 1, "n_items": 20_000, "feature_dim": 16, "sha256": own.sha256}

    shown = _recloop(kafka_settings, "show")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout.strip().splitlines()[-1]) == published

    again = _recloop(kafka_settings, "publish", str(tmp_path / "mine"))
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout.strip().splitlines()[-1])["version"] == 2

    exported = _recloop(kafka_settings, "export", str(tmp_path / "copy"))
    assert exported.returncode == 0, exported.stderr
    back = load_catalogue(tmp_path / "copy")
    assert back.version == 2 and back.sha256 == own.sha256


def test_a_missing_or_damaged_copy_is_one_line_naming_the_argument(kafka_settings, tmp_path):
    proc = _recloop(kafka_settings, "publish", str(tmp_path / "nothing-here"))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no readable catalogue" in lines[0] and "DIRECTORY" in lines[0]
