"""``recloop report`` renders in a real browser: Debian's headless Chromium opens the page.

A run with two policy arms (a learner that moved through versions 0..3, and ``random``) and
lag/freshness samples goes into a real SQLite ``Storage``; ``build_report`` writes the page.
Chromium then takes a screenshot (kept as ``artifacts/test-report/report.png``) and dumps the
DOM after load, with a probe script that records what the browser itself decoded for each
image. Every image must be an embedded PNG (the page is viewable offline) that the browser
decoded at the size of the PNG exported next to it, and the summary tables list both arms
with the episode totals and returns the stored windows add up to.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from recloop.ops.report import build_report
from recloop.storage.store import Outcome, Sample, Storage

pytestmark = pytest.mark.integration

ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts" / "test-report"
WINDOW_S = 10
WINDOWS = 12
START = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _outcomes() -> list[Outcome]:
    """A learner whose return and CTR rise as versions 0..3 take over; random stays flat."""
    rows = []
    for w in range(WINDOWS):
        start = START + timedelta(seconds=WINDOW_S * w)
        end = start + timedelta(seconds=WINDOW_S)
        version = min(3, w // 3)
        rows.append(
            Outcome("slateq", version, start, end, 20 + w, 2.0 + 0.3 * w, 0.2 + 0.02 * w,
                    0.5 + 0.01 * w, 200)
        )  # fmt: skip
        rows.append(Outcome("random", 0, start, end, 20, 2.0 + 0.05 * (-1) ** w, 0.2, 0.5, 200))
    return rows


def _samples() -> list[Sample]:
    points = []
    for i in range(2 * WINDOWS):
        ts = START + timedelta(seconds=WINDOW_S / 2 * i)
        lag = 100.0 - 4 * i if i < WINDOWS else 10.0 + i  # caught up, then fell behind again
        points.append(Sample(ts, "learner_lag_messages", lag, {"policy": "slateq"}))
        points.append(Sample(ts, "freshness_seconds", 3.0 + i % 5, {"policy": "slateq"}))
    return points


def _chromium() -> str:
    exe = shutil.which("chromium") or (
        "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
    )
    if exe is None:
        pytest.fail(
            "Chromium is needed to check the report page; on Debian: apt-get install chromium",
            pytrace=False,
        )
    return exe


def _run_chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [
        _chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90, check=False)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


class _Page(HTMLParser):
    """The parts of the dumped DOM the test reads: images, table cells by table id, body attrs."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.body: dict[str, str] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a)
        elif tag == "body":
            self.body = a
        elif tag == "table":
            self._table = a.get("id", "")
            self.tables[self._table] = []
        elif tag == "tr" and self._table is not None:
            self.tables[self._table].append([])
        elif tag == "td" and self._table is not None:
            self._cell = []

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None and self._table is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None


# Runs on load: what the browser decoded for each <img>, written where --dump-dom shows it.
_PROBE = (
    "<script>window.addEventListener('load', () => document.body.setAttribute("
    "'data-images', JSON.stringify([...document.images].map("
    "i => [i.alt, i.complete, i.naturalWidth, i.naturalHeight]))));</script>"
)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    with Storage(f"sqlite:///{out / 'recloop.db'}") as storage:
        run_id = storage.start_run({"algo": "slateq", "test": "report page"}, started=START)
        storage.record_outcomes(run_id, _outcomes())
        storage.record_samples(run_id, _samples())
        storage.end_run(run_id, START + timedelta(seconds=WINDOW_S * WINDOWS))
        page = build_report(storage, run_id, out / "site")
    return page


def test_the_page_renders_in_chromium_and_the_screenshot_is_kept(report: Path, tmp_path):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    _run_chromium(
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,2400",
        report.as_uri(),
    )
    shutil.copy(report, ARTIFACTS / "index.html")  # the page beside its picture, for people

    assert shot.exists() and shot.read_bytes()[:8] == PNG_MAGIC
    with Image.open(shot) as image:
        assert image.size == (1200, 2400)
        rgb = image.convert("RGB")
    # Not a blank or error page: plots bring many colours and cover a real share of it.
    colours = rgb.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 200, "screenshot has almost no colours"
    ink = sum(count for count, rgb_ in colours if sum(rgb_) < 3 * 235)
    assert ink > 0.02 * 1200 * 2400, f"only {ink} non-white pixels"


def test_every_image_is_an_embedded_png_the_browser_decoded(report: Path, tmp_path):
    probed = report.with_name("probed.html")
    probed.write_text(report.read_text().replace("</body>", f"{_PROBE}</body>"))
    # The virtual-time budget lets the load event (and the probe) run before the dump.
    dom = _run_chromium(
        tmp_path / "profile", "--virtual-time-budget=3000", "--dump-dom", probed.as_uri()
    ).stdout
    page = _Page()
    page.feed(dom)

    assert {img["alt"] for img in page.images} == {"learning_curve", "ctr", "lag"}
    decoded = {alt: (done, w, h) for alt, done, w, h in json.loads(page.body["data-images"])}
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix), f"{img['alt']} is not embedded: {img['src'][:60]}"
        data = base64.b64decode(img["src"][len(prefix) :], validate=True)
        assert data[:8] == PNG_MAGIC
        with Image.open(io.BytesIO(data)) as image:
            image.verify()  # the whole PNG, CRCs included
        with Image.open(io.BytesIO(data)) as image:
            size = image.size
        exported = report.parent / f"{img['alt']}.png"
        assert data == exported.read_bytes(), f"{img['alt']}: embedded and exported PNGs differ"
        assert size[0] >= 600 and size[1] >= 300, size
        assert decoded[img["alt"]] == (True, *size), f"browser decoded {decoded[img['alt']]}"


def test_summary_tables_list_both_policies_with_their_totals(report: Path, tmp_path):
    dom = _run_chromium(tmp_path / "profile", "--dump-dom", report.as_uri()).stdout
    page = _Page()
    page.feed(dom)
    # columns: policy, episodes, mean return, CTR, clicked quality, versions
    overall = {row[0]: row for row in page.tables["overall"] if row}
    learned = {row[0]: row for row in page.tables["learned"] if row}
    assert set(overall) == {"slateq", "random"}
    assert set(learned) == {"slateq"}  # random never served a learned version

    for policy, rows in (("slateq", overall), ("random", overall), ("slateq", learned)):
        windows = [
            o for o in _outcomes()
            if o.policy == policy and (rows is overall or o.version > 0)
        ]  # fmt: skip
        episodes = sum(o.episodes for o in windows)
        mean_return = sum(o.mean_return * o.episodes for o in windows) / episodes
        versions = len({o.version for o in windows})
        # CTR per served slate, clicked quality per click: both weighted by the windows' sizes.
        slates = sum(o.served_slates for o in windows)
        clicks = sum(o.ctr * o.served_slates for o in windows)
        quality = sum(o.clicked_quality * o.ctr * o.served_slates for o in windows) / clicks
        row = rows[policy]
        assert int(row[1]) == episodes, (policy, row)
        assert row[2] == f"{mean_return:.2f}", (policy, row)
        assert (row[3], row[4]) == (f"{clicks / slates:.3f}", f"{quality:.3f}"), (policy, row)
        assert int(row[5]) == versions, (policy, row)
