"""``leakbench report RUN_DIR``: one HTML page per run with each cell's numbers and figure."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from leakbench.report import report_command, write_report
from leakbench.runner import run
from tests.components import small_bias_run

# One worker builds this module's shared fixtures once (see tests/conftest.py).
pytestmark = pytest.mark.xdist_group("report")


class Page(HTMLParser):
    """The images, anchors and cell texts of a page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.images: list[dict[str, str]] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self.cells: list[str] = []
        self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        values = dict(attrs)
        if tag == "img":
            self.images.append(values)
        if "id" in values:
            self.ids.add(values["id"])
        if tag == "a" and "href" in values:
            self.links.append(values["href"])
        self._in_cell = tag == "td"

    def handle_endtag(self, tag):
        self._in_cell = False

    def handle_data(self, data):
        if self._in_cell:
            self.cells.append(data.strip())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    config = small_bias_run(
        root,
        dataset_options={"input_shape": [1, 8, 8], "num_classes": 3, "size": 16},
        batch_sizes=[1, 3],
    )
    run(config, progress=False, echo=lambda _: None)
    return root / "run"


def test_the_page_holds_each_cells_median_and_links_figures_that_exist(run_dir):
    page_path = write_report(run_dir)
    assert page_path == run_dir / "report.html"
    page = Page(page_path.read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(page.images) == len(summary["cells"]) == 2
    for cell, image in zip(summary["cells"], page.images, strict=True):
        figure = page_path.parent / image["src"]
        assert figure.resolve() == (run_dir / "figures" / f"{cell}.png").resolve()
        with Image.open(figure) as png:
            assert (int(image["width"]), int(image["height"])) == png.size
        median = summary["cells"][cell]["psnr"]["median"]
        assert f"{median:.2f}" in page.cells
    # every in-page link has its target; the config and the environment are on the page
    assert {h[1:] for h in page.links if h.startswith("#")} <= page.ids
    text = page_path.read_text()
    assert "synthetic-uniform" in text and "threads_per_process" in text
    assert "<style>" in text and "font-family" in text  # the site's stylesheet, inlined


def test_a_page_elsewhere_links_the_figures_relatively(run_dir, tmp_path):
    page_path = write_report(run_dir, tmp_path / "pages" / "run.html")
    page = Page(page_path.read_text())
    for image in page.images:
        assert not Path(image["src"]).is_absolute() and image["src"].startswith("../")
        assert (page_path.parent / image["src"]).is_file()


def test_rendering_twice_gives_the_same_bytes(run_dir, tmp_path):
    first = write_report(run_dir, tmp_path / "a.html").read_bytes()
    assert write_report(run_dir, tmp_path / "b.html").read_bytes() == first


def test_the_command_prints_where_the_page_is(run_dir, tmp_path, capsys):
    assert report_command(str(run_dir), str(tmp_path / "r.html")) == 0
    assert capsys.readouterr().out == f"report: {tmp_path / 'r.html'}\n"


def test_bad_input_is_refused_in_one_line(tmp_path, run_dir):
    with pytest.raises(ValueError, match=r"^run_dir: '.*empty' holds no summary.json, expected"):
        write_report(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"^output: '.*report.txt', expected a file name ending"):
        write_report(run_dir, tmp_path / "report.txt")
    assert not (tmp_path / "report.txt").exists()
