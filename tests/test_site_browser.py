"""The web leaderboard in a real headless Chromium: it loads from file:// without console
errors, shows one row per entry, and sorts when a column header is clicked.

The site is built from the shipped entries (``leaderboards/entries``). The test also writes a
screenshot of the index page to ``$LEAKBENCH_SCREENSHOT`` (default ``runs/site-screenshot.png``).
Where Chromium is missing it is skipped, naming the Debian package to install.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leakbench.leaderboard import LEADERBOARDS, build_site, load_board
from tests.browser import Browser, find_chromium

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("site_browser")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = Path(os.environ.get("LEAKBENCH_SCREENSHOT", ROOT / "runs" / "site-screenshot.png"))
ROWS = "Array.from(document.querySelectorAll('table.board tbody tr'))"


@pytest.fixture(scope="module")
def browser():
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed: apt-get install -y chromium (Debian package)")
    instance = Browser(executable)
    yield instance
    instance.close()


def column(browser: Browser, table: int, key: str) -> list[str]:
    """Column ``key`` of table ``table``, top to bottom: a cell's ``data-value`` or text."""
    return browser.evaluate(
        f"(() => {{ const t = document.querySelectorAll('table.board')[{table}];"
        f" const i = t.querySelector('th[data-key={key}]').cellIndex;"
        " return Array.from(t.tBodies[0].rows, r => r.cells[i].hasAttribute('data-value')"
        " ? r.cells[i].getAttribute('data-value') : r.cells[i].textContent.trim()); })()"
    )


def test_the_site_loads_sorts_and_links_in_chromium(browser, tmp_path):
    entries = LEADERBOARDS / "entries"
    boards = load_board(entries)
    expected = sum(len(board.rows) for board in boards)
    assert expected, "no shipped entries to show"
    build_site(entries, tmp_path / "site")

    browser.open((tmp_path / "site" / "index.html").as_uri())
    assert browser.console_errors() == []
    assert browser.evaluate(f"{ROWS}.length") == expected
    names = browser.evaluate(f"{ROWS}.map(r => r.dataset.name)")
    assert sorted(names) == sorted(row.entry["name"] for b in boards for row in b.rows)

    # The largest table: click "PSNR median" twice, then "entry".
    sizes = browser.evaluate(
        "Array.from(document.querySelectorAll('table.board'), t => t.tBodies[0].rows.length)"
    )
    table = sizes.index(max(sizes))
    assert max(sizes) >= 2, "sorting needs a table with two rows"
    browser.evaluate(f"document.querySelectorAll('table.board')[{table}].id = 'largest'; 0")
    before = column(browser, table, "name")
    browser.click("#largest th[data-key=psnr_median]")
    values = [float(v) for v in column(browser, table, "psnr_median")]
    assert values == sorted(values, reverse=True)
    browser.click("#largest th[data-key=psnr_median]")
    values = [float(v) for v in column(browser, table, "psnr_median")]
    assert values == sorted(values)
    browser.click("#largest th[data-key=name]")
    after = column(browser, table, "name")
    assert after == sorted(before, key=str.lower)
    header = "document.querySelector('#largest th[data-key=name]')"
    assert browser.evaluate(f"{header}.getAttribute('aria-sort')") == "ascending"
    assert browser.console_errors() == []
    browser.click("#largest th[data-key=rank]")  # back to the ranking for the screenshot
    browser.click("#largest th[data-key=rank]")
    print(f"screenshot: {browser.screenshot(SCREENSHOT)}")

    # Every entry page loads without errors, and its thumbnails are real images.
    for link in browser.evaluate(f"{ROWS}.map(r => r.querySelector('a').href)"):
        browser.open(link)
        assert browser.console_errors() == [], link
        widths = browser.evaluate("Array.from(document.images, i => i.naturalWidth)")
        assert widths and all(w > 0 for w in widths), link


def choose_threat_model(browser: Browser, letter: str) -> list[str]:
    """Choose ``letter`` in the site's threat-model filter ('' for every threat model); the
    letters of the rows left visible, in page order."""
    browser.evaluate(
        "(() => { const s = document.getElementById('threat-model');"
        f" s.value = {letter!r}; s.dispatchEvent(new Event('change')); return 0; }})()"
    )
    return browser.evaluate(
        f"{ROWS}.filter(r => r.offsetParent !== null).map(r => r.dataset.threatModel)"
    )


def test_the_threat_model_filter_keeps_the_entries_a_letter_admits_in_chromium(browser, tmp_path):
    from leakbench.capabilities import THREAT_MODELS, admitted_letters
    from leakbench.leaderboard.board import attack_letter

    entries = LEADERBOARDS / "entries"
    letters = [attack_letter(row.entry) or "" for b in load_board(entries) for row in b.rows]
    build_site(entries, tmp_path / "site")
    browser.open((tmp_path / "site" / "index.html").as_uri())
    assert browser.evaluate(f"{ROWS}.map(r => r.dataset.threatModel)") == letters
    narrowed = 0
    for letter in THREAT_MODELS:
        admitted = admitted_letters(letter)
        shown = choose_threat_model(browser, letter)
        assert shown == [x for x in letters if x in admitted], letter
        narrowed += 0 < len(shown) < len(letters)
        # A table part whose every row is filtered out disappears with its heading.
        empty = browser.evaluate(
            "Array.from(document.querySelectorAll('div.part'), p => p.offsetParent === null"
            " && Array.from(p.querySelectorAll('tbody tr')).every(r => r.offsetParent === null))"
        )
        visible_rows = browser.evaluate(
            "Array.from(document.querySelectorAll('div.part'), p =>"
            " Array.from(p.querySelectorAll('tbody tr')).some(r => r.offsetParent !== null))"
        )
        assert [not v for v in visible_rows] == empty, letter
    assert narrowed, "the shipped entries hold a single letter: the filter was not exercised"
    assert choose_threat_model(browser, "") == letters  # every threat model again
    assert browser.console_errors() == []
