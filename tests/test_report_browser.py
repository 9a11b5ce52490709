"""The HTML report in a real browser: headless Chromium from the system packages, driven by playwright.

The page opens from a file:// URL with no console errors and no request beyond its own file; the heatmap
renders (a screenshot: many distinct colours, each cell's centre pixel the colour computed here from the
node's signed mean and the symmetric limit); hovering a cell shows that node's label, signed mean, mean
|score| and verified effect, compared with numbers computed here from the per-pair scores and from exact
activation patching; clicking a table header sorts the rows (read back and compared with Python's sort).

Skipped only when no Chromium is installed (``apt-get install -y chromium``; ``ATPF_CHROMIUM`` names another
binary). CI sets ``ATPF_REQUIRE_BROWSER=1``, which turns that skip into a failure. Screenshots go to the
test's temporary folder (``ATPF_SCREENSHOTS`` names another)."""

import io
import math
import os
import re
import shutil
from pathlib import Path

import pytest
from report_helpers import HOSTILE, report_inputs

from atpframework.analysis.report import write_report

CHROMIUM = os.environ.get("ATPF_CHROMIUM") or next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        reason = "no Chromium installed (apt-get install -y chromium, or set ATPF_CHROMIUM to a Chromium binary)"
        if os.environ.get("ATPF_REQUIRE_BROWSER") == "1":
            pytest.fail(reason + "; ATPF_REQUIRE_BROWSER=1 says this run must test in a browser")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright  # the `test` extra installs it

    with sync_playwright() as p:
        # playwright's own browser download needs the network: use the system binary. Root (CI containers)
        # cannot use Chromium's sandbox.
        args = ["--no-sandbox"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
        instance = p.chromium.launch(executable_path=CHROMIUM, args=args)
        yield instance
        instance.close()


@pytest.fixture(scope="module")
def inputs():
    return report_inputs()


@pytest.fixture(scope="module")
def report(inputs, tmp_path_factory):
    result, _, diagnosis = inputs
    return write_report(result, tmp_path_factory.mktemp("report") / "report.html", diagnosis=diagnosis)


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = Path(os.environ.get("ATPF_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Opened:
    """A page with the report loaded, and what it logged and requested."""

    def __init__(self, browser, path):
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, device_scale_factor=1)
        self.requests, self.console, self.errors = [], [], []
        self.context.route(re.compile(r"^(?!file:)"), lambda route: (self.requests.append(route.request.url), route.abort()))
        self.page = self.context.new_page()
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("console", lambda m: self.console.append((m.type, m.text)))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.errors.append(f"dialog: {d.message}"), d.dismiss()))
        self.url = path.resolve().as_uri()
        self.page.goto(self.url, wait_until="load")


@pytest.fixture
def opened(browser, report):
    view = Opened(browser, report)
    yield view
    view.context.close()


def heatmap(page, selection, view=0):
    return page.locator(f'.heatmap[data-sel="{selection}"][data-view="{view}"]')


def tooltip(page):
    return {key: page.locator(f'#tip [data-key="{key}"] .v').text_content() for key in ("node", "signed", "score", "verified")}


def test_the_page_loads_offline_without_errors(opened, inputs):
    page = opened.page
    assert opened.errors == []
    assert [m for m in opened.console if m[0] in ("error", "warning")] == []
    assert opened.requests == [opened.url]  # the file itself, nothing else
    for section in ("summary", "prompts", "heatmaps", "top", "verification", "diagnosis"):
        assert page.locator(f"section#{section}").count() == 1, section
    # a token "</script><script>window.__pwned = 1</script>" is shown as text, never run
    assert page.evaluate("typeof window.__pwned") == "undefined"
    noise = page.locator('.pair >> nth=0 >> [data-which="noise"] .tok')
    assert noise.nth(1).text_content() == HOSTILE[9] and noise.nth(4).text_content() == HOSTILE[11]
    assert page.locator(".tok b").count() == 0
    assert "diff" in noise.nth(1).get_attribute("class") and "diff" not in noise.nth(0).get_attribute("class")
    result, _, diagnosis = inputs
    assert page.locator('[data-fact="method"]').text_content() == "atp"
    assert page.locator("#diagnosis .warnings li").all_text_contents() == [f"warning: {w}" for w in diagnosis.warnings()]
    assert page.locator("#top-table tbody tr").count() == 50


def _pixels(png):
    from PIL import Image

    return Image.open(io.BytesIO(png)).convert("RGB")


def _expected_colour(value, limit):
    """The report's diverging scale, computed independently: white (247,247,247) to red (178,24,43) for
    positive values, to blue (33,102,172) for negative, linear in value / limit."""
    t = max(-1.0, min(1.0, value / limit))
    end = (178, 24, 43) if t >= 0 else (33, 102, 172)
    return tuple(math.floor(247 + (e - 247) * abs(t) + 0.5) for e in end)


def test_the_heatmap_renders(opened, inputs, shots):
    page, result = opened.page, inputs[0]
    box = heatmap(page, "attn_head")
    page.screenshot(path=str(shots / "report_page.png"), full_page=True)
    cells = box.locator("g.cells")
    png = cells.screenshot(path=str(shots / "report_heatmap.png"))
    image = _pixels(png)
    colours = set(image.getdata())
    assert len(colours) >= 20, f"{len(colours)} distinct colours in the heatmap ({shots / 'report_heatmap.png'})"
    not_white = sum(1 for c in image.getdata() if c != (255, 255, 255)) / (image.width * image.height)
    assert not_white > 0.7
    # every cell's centre pixel: the colour of its node's signed mean over pairs, against the grid's symmetric limit
    selected = int(box.locator("select.slice").input_value())
    per_pair = result["attn_head"].per_pair.double()  # pair layer pos head
    means = per_pair.mean(0)
    limit = float(means.abs().max())  # symmetric: the largest |signed mean| over all positions
    origin = cells.bounding_box()
    rects = box.locator("rect.cell")
    assert rects.count() == 4 * 8
    for k in range(rects.count()):
        rect = rects.nth(k).bounding_box()
        layer, head = int(rects.nth(k).get_attribute("data-row")), int(rects.nth(k).get_attribute("data-col"))
        x, y = rect["x"] - origin["x"] + rect["width"] / 2, rect["y"] - origin["y"] + rect["height"] / 2
        got = image.getpixel((int(x), int(y)))
        want = _expected_colour(float(means[layer, selected, head]), limit)
        assert max(abs(a - b) for a, b in zip(got, want)) <= 2, (layer, head, got, want)


def test_the_grid_opens_on_the_strongest_position_and_switches(opened, inputs):
    page, result = opened.page, inputs[0]
    box = heatmap(page, "attn_head")
    strongest = int(result["attn_head"].aggregate("mean_abs").amax(dim=(0, 2)).argmax())
    assert int(box.locator("select.slice").input_value()) == strongest
    box.locator("select.slice").select_option("2")
    assert box.locator('rect.cell[data-row="0"][data-col="0"]').get_attribute("data-node") == str(2 * 8)
    box.locator("select.mode").select_option("score")  # sequential white to purple, the largest score darkest
    score = result["attn_head"].aggregate("mean_abs")[:, 2, :]
    layer, head = divmod(int(score.argmax()), 8)
    largest_anywhere = float(result["attn_head"].aggregate("mean_abs").max())
    fill = box.locator(f'rect.cell[data-row="{layer}"][data-col="{head}"]').get_attribute("fill")
    t = float(score.max()) / largest_anywhere
    assert fill == "rgb(" + ",".join(str(math.floor(247 + (e - 247) * t + 0.5)) for e in (84, 39, 143)) + ")"


def _number(text):
    return float(text.replace("−", "-"))


def test_hovering_a_cell_shows_that_nodes_values(opened, inputs):
    page, (result, exact, _) = opened.page, inputs
    per_pair = result["attn_head"].per_pair.double()  # pair layer pos head
    truth = exact["attn_head"].per_pair.double().mean(0)
    box = heatmap(page, "attn_head")
    verified = result.verified["attn_head"].index.tolist()
    unverified = next(n for n in range(per_pair[0].numel()) if n not in verified)
    for flat in (verified[0], unverified):
        layer, rest = divmod(flat, 6 * 8)
        pos, head = divmod(rest, 8)
        box.locator("select.slice").select_option(str(pos))
        box.locator(f'rect.cell[data-node="{flat}"]').hover()
        assert page.locator("#tip").is_visible()
        shown = tooltip(page)
        assert shown["node"] == result.node_label(flat) == f'attn_head L{layer} H{head} @ {result.position_text(pos)[0]} (pos {pos})'
        assert _number(shown["signed"]) == pytest.approx(float(per_pair[:, layer, pos, head].mean()), rel=1e-4, abs=1e-9)
        assert _number(shown["score"]) == pytest.approx(float(per_pair[:, layer, pos, head].abs().mean()), rel=1e-4, abs=1e-9)
        if flat in verified:
            assert _number(shown["verified"]) == pytest.approx(float(truth[layer, pos, head]), rel=1e-3, abs=1e-6)
        else:
            assert shown["verified"] == "not verified"
        tokens = page.locator('#tip [data-key="tokens"] .v').text_content()
        assert tokens.startswith("clean ") and tokens.endswith(f"(pos {pos})")
    # a cell of the residual stream's layer x position grid
    resid = result["resid"].per_pair.double()  # pair layer pos
    heatmap(page, "resid").locator('rect.cell[data-row="2"][data-col="1"]').hover()
    shown = tooltip(page)
    assert shown["node"] == result.node_label(result.numbering.offsets[2] + 2 * 6 + 1)
    assert _number(shown["signed"]) == pytest.approx(float(resid[:, 2, 1].mean()), rel=1e-4, abs=1e-9)
    page.mouse.move(0, 0)
    assert page.locator("#tip").is_hidden()


def _column(page, key):
    index = page.locator("#top-table thead th").evaluate_all(f"(hs) => hs.findIndex((h) => h.dataset.col === {key!r})")
    return page.locator(f"#top-table tbody tr td:nth-child({index + 1})").evaluate_all("(tds) => tds.map((td) => td.dataset.value)")


def _flat(result, row):
    """A top_k row's flat index in its selection (row-major over ``layer *axes``), from its model coordinates."""
    ns, flat = result[row.name], 0
    for dim, size in zip(ns.dims[1:], ns.per_pair.shape[1:]):
        flat = flat * size + (0 if ns.index[dim] == "all" else ns.index[dim].index(row.coords[dim]))
    return flat


def _click(page, key):
    page.locator(f'#top-table th[data-col="{key}"] button').click()


def test_clicking_a_header_sorts_the_table(opened, inputs):
    page, result = opened.page, inputs[0]
    rows = result.top_k(50)
    signed = [row.signed_estimate for row in rows]
    assert [float(v) for v in _column(page, "signed")] == pytest.approx(signed, rel=1e-6)  # as ranked
    _click(page, "signed")
    assert [float(v) for v in _column(page, "signed")] == pytest.approx(sorted(signed), rel=1e-6)
    assert page.locator('#top-table th[data-col="signed"]').get_attribute("aria-sort") == "ascending"
    _click(page, "signed")
    assert [float(v) for v in _column(page, "signed")] == pytest.approx(sorted(signed, reverse=True), rel=1e-6)
    # the verified effect: numbers in order, the nodes not verified (empty) last in both directions
    effects = {name: dict(zip(v.index.tolist(), v.effects.double().mean(0).tolist())) for name, v in result.verified.items()}
    column = [effects.get(row.name, {}).get(_flat(result, row), math.nan) for row in rows]
    known = [v for v in column if not math.isnan(v)]
    assert 0 < len(known) < len(column)
    for descending in (False, True):
        _click(page, "verified")
        got = _column(page, "verified")
        assert got[len(known):] == [""] * (len(column) - len(known))
        assert [float(v) for v in got[: len(known)]] == pytest.approx(sorted(known, reverse=descending), rel=1e-6)
    _click(page, "kind")
    assert _column(page, "kind") == sorted(row.kind for row in rows)
    _click(page, "rank")
    assert _column(page, "rank") == [str(i) for i in range(1, 51)]
