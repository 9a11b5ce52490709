"""Screenshot of an HTML report for the docs (docs/assets/report.png), in headless Chromium through playwright.

    .venv/bin/python scripts/report_screenshot.py REPORT.html OUT.png [--chromium /usr/bin/chromium]

Hovers the strongest head of the first head heatmap, then stacks clips of the page: the title, the prompts and
the first row of heatmaps, the first rows of the top-nodes table, verification and the diagnostic bound (the
sections the report has). Fails if the page logs an error.
"""

import argparse
import io
import os
import shutil
from pathlib import Path

from PIL import Image
from playwright.sync_api import sync_playwright

WIDTH = 1200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report")
    parser.add_argument("out")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--table-rows", type=int, default=8)
    args = parser.parse_args()
    with sync_playwright() as p:
        sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
        browser = p.chromium.launch(executable_path=args.chromium, args=sandbox)
        page = browser.new_page(viewport={"width": WIDTH, "height": 8000}, device_scale_factor=1)
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(Path(args.report).resolve().as_uri())
        heatmap = page.locator(".heatmap").first
        view = page.evaluate("() => JSON.parse(document.getElementById('atpf-data').textContent)"
                             ".selections.find((s) => s.views.length).views[0]")
        shown = int(heatmap.locator("select.slice").input_value()) if heatmap.locator("select.slice").count() else 0
        scores = view["grids"][shown]["score"]
        row, col = max(((i, j) for i in range(len(scores)) for j in range(len(scores[0]))),
                       key=lambda ij: scores[ij[0]][ij[1]] if isinstance(scores[ij[0]][ij[1]], (int, float)) else -1)
        heatmap.locator(f'rect.cell[data-row="{row}"][data-col="{col}"]').hover()

        def box(selector: str) -> dict[str, float] | None:
            found = page.locator(selector)
            return found.first.bounding_box() if found.count() else None

        header, prompts, first_row = box("header"), box("section#prompts"), box(".heatmap")
        assert header and prompts and first_row
        clips = [(0, header["y"] + header["height"] + 4), (prompts["y"], first_row["y"] + first_row["height"] + 8)]
        top, last_row = box("section#top"), box(f"#top-table tbody tr:nth-child({args.table_rows})")
        if top and last_row:
            clips.append((top["y"], last_row["y"] + last_row["height"] + 4))
        tail = [b for b in (box("section#verification"), box("section#diagnosis")) if b]
        if tail:
            clips.append((tail[0]["y"], tail[-1]["y"] + tail[-1]["height"] + 4))
        shots = [Image.open(io.BytesIO(page.screenshot(clip={"x": 0, "y": y0, "width": WIDTH, "height": y1 - y0}))).convert("RGB")
                 for y0, y1 in clips]
        browser.close()
    if errors:
        raise SystemExit(f"the page logged errors: {errors}")
    gap = 14
    sheet = Image.new("RGB", (WIDTH, sum(s.height for s in shots) + gap * (len(shots) - 1)), (255, 255, 255))
    y = 0
    for i, shot in enumerate(shots):
        sheet.paste(shot, (0, y))
        y += shot.height + gap
        if i < len(shots) - 1:
            sheet.paste((200, 200, 200), (0, y - gap // 2 - 1, WIDTH, y - gap // 2 + 1))
    sheet.save(args.out, optimize=True)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} kB, {sheet.width} x {sheet.height})")


if __name__ == "__main__":
    main()
