"""The report of a real (short) digits run, opened in headless Chromium through Playwright: no
console errors, no request leaves the file, every image decodes, the final table shows
metrics.json's numbers, and the page fits a desktop and a phone screen.

Chromium is Debian's (``apt-get install -y chromium``; ``.ci/run`` installs it as root), or the
browser named by ``BARLOW_CHROMIUM``; Playwright never downloads one. Without a browser this test
fails, saying how to get one: a skipped browser test would hide a broken page.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from barlow.cli import main
from runs import sets

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTHS = (1280, 390)
# Two epochs of the embedded digits, a small projector, online kNN every epoch, the final
# evaluation with its baselines (a short probe).
RUN = [
    'method.projector="32-32"',
    "train.batch_size=128",
    "train.epochs=2",
    "train.log_every=4",
    "optim.warmup_epochs=1",
    "eval.online_knn_every=1",
    "eval.probe_epochs=20",
    "eval.baselines=true",
    'data.augment_on="device"',
]


def chromium_path() -> str:
    """The browser to drive: ``BARLOW_CHROMIUM``, else the first of ``BROWSERS`` on PATH."""
    given = os.environ.get("BARLOW_CHROMIUM")
    if given:
        if not Path(given).is_file():
            pytest.fail(f"BARLOW_CHROMIUM={given} is not a file")
        return given
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    pytest.fail(
        "no Chromium to open the report in: install Debian's (apt-get install -y chromium) or "
        "set BARLOW_CHROMIUM=/path/to/chromium; .ci/run installs it when it runs as root"
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch digits run and its report: (run directory, report file)."""
    root = tmp_path_factory.mktemp("report")
    run, page = root / "digits-run", root / "report.html"
    assert main(["pretrain", "digits", "--out", str(run), "--quiet", *sets(*RUN)]) == 0
    assert main(["report", str(run), "--out", str(page), "--quiet"]) == 0
    return run, page


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the browser test needs Playwright: pip install -e '.[dev]'")
    executable = chromium_path()
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=executable, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def opened(browser: Any, made: tuple[Path, Path]) -> Iterator[dict[str, Any]]:
    """The report loaded at 1280 px, with what the browser said and asked for meanwhile."""
    page = browser.new_page(viewport={"width": WIDTHS[0], "height": 900})
    errors: list[str] = []
    requests: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("request", lambda r: requests.append(r.url))
    url = made[1].resolve().as_uri()
    page.goto(url, wait_until="load")
    yield {"page": page, "errors": errors, "requests": requests, "url": url}
    page.close()


def test_no_console_errors_and_nothing_fetched(opened: dict[str, Any]) -> None:
    assert opened["errors"] == []
    fetched = [u for u in opened["requests"] if u != opened["url"] and not u.startswith("data:")]
    assert fetched == []


def test_every_image_decodes(opened: dict[str, Any]) -> None:
    images = opened["page"].evaluate(
        "Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])"
    )
    # curves (steps, online kNN, monitors), views, map, neighbours; insight figures if written
    assert len(images) >= 6
    assert [alt for alt, complete, width in images if not (complete and width > 0)] == []


def test_final_table_shows_metrics_json(opened: dict[str, Any], made: tuple[Path, Path]) -> None:
    metrics = json.loads((made[0] / "metrics.json").read_text())
    cells = opened["page"].evaluate(
        "Array.from(document.querySelectorAll('.run-results td[data-key]'))"
        ".map(td => [JSON.parse(td.dataset.key), td.innerText.trim()])"
    )
    keys = {tuple(path) for path, _ in cells}
    for encoder in ("pretrained", "random init", "raw pixels"):
        for column in ("knn_top1", "linear_top1"):
            assert ("evaluation", encoder, column) in keys
    for path, text in cells:
        value = metrics
        for key in path:
            value = value[key]
        assert_shown(text, value, path)


def assert_shown(text: str, value: float, path: list[str]) -> None:
    """``text`` is ``value`` rounded to the digits shown (a percentage for a ``%`` cell): they
    differ by at most half a unit of the last digit shown."""
    number, percent = text.removesuffix("%").strip(), text.endswith("%")
    shown = 100.0 * value if percent else value
    if "e" in number:  # scientific notation, 4 significant digits
        mantissa = number.split("e")[0]
        exponent = int(number.split("e")[1])
        tolerance = 0.5 * 10.0 ** (exponent - len(mantissa.partition(".")[2]))
    elif "." in number:
        tolerance = 0.5 * 10.0 ** -len(number.partition(".")[2])
    else:
        tolerance = 0.0 if isinstance(value, int) else 0.5
    assert abs(float(number) - shown) <= tolerance * (1 + 1e-9), (path, text, value)


@pytest.mark.parametrize("width", WIDTHS)
def test_readable_without_horizontal_scrolling(opened: dict[str, Any], width: int) -> None:
    page = opened["page"]
    page.set_viewport_size({"width": width, "height": 900})
    scroll, inner = page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll <= inner
    widest = page.evaluate(
        "Math.max(...Array.from(document.images).map(i => i.getBoundingClientRect().right))"
    )
    assert widest <= inner  # images scale down to the screen
    if width < 500:  # a phone: the figures are shrunk, not cropped
        shrunk = page.evaluate(
            "Array.from(document.images).some(i => i.clientWidth < i.naturalWidth)"
        )
        assert shrunk
