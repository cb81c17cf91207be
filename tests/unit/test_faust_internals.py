"""The faust, mode and aiokafka internals recloop.streams relies on: present, and guarded.

``recloop.streams.faust_internals`` lists every library name it uses (``RELIED_ON``); if an
upgrade renamed one, the batch delivery would silently stop running or the at-least-once
bookkeeping would break, so each is checked on the installed libraries here, and a version
the module was not checked against is refused on import.
"""

from __future__ import annotations

import importlib.util
from importlib import metadata

import faust
import pytest
from faust.transport.consumer import Fetcher

from recloop.streams import faust_internals
from recloop.streams.faust_internals import RELIED_ON, TESTED, UntestedVersion, check_versions


def _instances() -> dict[str, object]:
    """One instance of each class whose relied-on names are set per instance."""
    app = faust.App(
        "internals-test", broker="kafka://127.0.0.1:1", store="memory://",
        web_enabled=False, autodiscover=False,
    )  # fmt: skip
    return {
        "faust.transport.drivers.aiokafka:Consumer": app.consumer,  # built, never started
        "faust.transport.consumer:Fetcher": Fetcher(app),
    }


def test_every_name_relied_on_exists_on_the_installed_libraries():
    instances = _instances()
    missing = []
    for reliance in RELIED_ON:
        cls = reliance.owner_class()
        if reliance.on == "class":
            holder = cls
        else:
            assert reliance.owner in instances, f"no instance to check {reliance} on"
            holder = instances[reliance.owner]
            assert isinstance(holder, cls)
        if not hasattr(holder, reliance.name):
            missing.append(f"{reliance.owner}.{reliance.name}")
    assert missing == []


def test_the_overridden_fetch_loop_is_the_one_faust_calls():
    # faust's Fetcher runs consumer._drain_messages; an override under another name would
    # never run, and every record would silently take the per-record route.
    import inspect

    assert "consumer._drain_messages(self)" in inspect.getsource(Fetcher)
    assert "_drain_messages" in faust_internals.BatchConsumer.__dict__


def test_the_private_names_are_each_explained_in_the_docstring():
    doc = faust_internals.__doc__ or ""
    private = {r.name for r in RELIED_ON if r.private}
    assert {"_drain_messages", "_read_offset", "_add_gap", "_commit_every", "_n_acked",
            "_stopped", "_ensure_producer"} <= private  # fmt: skip
    for name in private:
        assert f".{name}``" in doc or f".{name}(" in doc, name  # e.g. ``Consumer._add_gap(``


def test_the_installed_versions_are_the_tested_ones():
    installed = faust_internals.installed_versions()
    assert set(installed) == {"faust-streaming", "mode-streaming", "aiokafka"}
    assert all(installed[dist] in TESTED[dist] for dist in TESTED)
    check_versions()  # does not raise


def test_an_untested_version_is_refused_with_both_versions_named():
    installed = {"faust-streaming": "0.16.0", "mode-streaming": "0.7.1", "aiokafka": "0.14.0"}
    with pytest.raises(UntestedVersion) as refused:
        check_versions(installed)
    message = str(refused.value)
    assert "installed: faust-streaming 0.16.0, mode-streaming 0.7.1, aiokafka 0.14.0" in message
    assert "tested only with faust-streaming 0.15.3, mode-streaming 0.7.1, aiokafka 0.14.0" in (
        message
    )


def test_a_missing_library_is_refused_too():
    with pytest.raises(UntestedVersion, match=r"aiokafka \(not installed\)"):
        check_versions({"faust-streaming": "0.15.3", "mode-streaming": "0.7.1", "aiokafka": None})


def test_importing_the_module_under_an_untested_aiokafka_refuses(monkeypatch):
    real = metadata.version

    def version(dist: str) -> str:
        return "0.15.0" if dist == "aiokafka" else real(dist)

    monkeypatch.setattr(metadata, "version", version)
    # A fresh copy of the module, so the real one (and the classes others hold) stay as they are.
    spec = importlib.util.spec_from_file_location("faust_internals_probe", faust_internals.__file__)
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    with pytest.raises(ImportError) as refused:
        spec.loader.exec_module(probe)
    message = str(refused.value)
    assert "installed: faust-streaming 0.15.3, mode-streaming 0.7.1, aiokafka 0.15.0" in message
    assert "aiokafka 0.14.0" in message
    assert not hasattr(probe, "BatchConsumer")  # refused before anything relies on internals


def test_a_hole_the_fetch_loop_delivered_past_is_a_stall():
    from recloop.streams.faust_internals import stalled_partitions

    acked = {"a": [12, 13, 14], "b": [12, 13], "c": [6, 7], "d": [], "e": [9]}
    committed = {"a": 5, "b": 5, "c": 5, "d": 5, "e": None}
    read = {"a": 14, "b": 11, "c": 7, "d": 20, "e": 9}
    # a: delivered up to 14, acked from 12, committed 5: offsets 5..11 will never be acked.
    # b: the hole is still being re-delivered (read 11 < lowest acked 12): not stalled yet.
    # c: acked from 6 after committed 5: the next commit moves on. d, e: nothing to judge.
    assert stalled_partitions(acked, committed, read) == {"a": (5, 12)}
