"""Check the built benchmark page in a real browser (Playwright driving a headless Chromium).

Opens ``<html>/benchmarks/attention.html``, checks that its headings are those of the page source
(``docs/benchmarks/attention.rst``) in order, that every figure caption precedes its image, that all
32 images load (``naturalWidth > 0``), and saves a full-page screenshot.

Usage: ``python scripts/check_site.py [--html docs/_build/html] [--screenshot shot.png]``.
Exit status 0 when every check passes.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE_SOURCE = ROOT / "docs" / "benchmarks" / "attention.rst"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def expected_page(source: Path = PAGE_SOURCE) -> tuple[list[str], list[tuple[str, str]]]:
    """Headings (title and sections, in order) and (caption, image file) pairs of the page source."""
    lines = source.read_text(encoding="utf-8").splitlines()
    headings = [line for line, under in zip(lines, lines[1:])
                if line.strip() and re.fullmatch(r"([=\-])\1+", under) and len(under) >= len(line)]
    figures = []
    for i, line in enumerate(lines):
        if m := re.fullmatch(r"\.\. image:: \.\./_static/(\d+\.png)", line):
            caption = next(text for text in reversed(lines[:i]) if text.strip())
            figures.append((caption, m.group(1)))
    return headings, figures


_PAGE_SCRIPT = """() => {
  const text = (el) => { const c = el.cloneNode(true);
    c.querySelectorAll('.headerlink').forEach((a) => a.remove()); return c.textContent.trim(); };
  const article = document.querySelector('article') || document.body;
  const headings = [...article.querySelectorAll('h1, h2')].map(text);
  const images = [...article.querySelectorAll('img')].filter((img) => /_images\\/|_static\\//.test(img.src))
    .map((img) => { const box = img.closest('a') || img; let prev = box.previousElementSibling;
      while (prev && !prev.textContent.trim()) prev = prev.previousElementSibling;
      return {src: img.src, complete: img.complete, width: img.naturalWidth,
              caption: prev ? prev.textContent.trim() : null}; });
  return {headings, images};
}"""


def check(html_dir: Path, screenshot: Path | None) -> list[str]:
    """Run the checks; returns the problems found (empty when all pass)."""
    from playwright.sync_api import sync_playwright

    page_file = html_dir.resolve() / "benchmarks" / "attention.html"
    if not page_file.exists():
        return [f"{page_file} does not exist: build the docs first"]
    headings, figures = expected_page()
    problems = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(page_file.as_uri(), wait_until="load")
            page.wait_for_function("() => [...document.images].every((img) => img.complete)",
                                   timeout=30_000)
            found = page.evaluate(_PAGE_SCRIPT)
            if screenshot is not None:
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    if found["headings"] != headings:
        problems.append(f"headings differ from the page source:\n  found    {found['headings']}"
                        f"\n  expected {headings}")
    images = found["images"]
    if len(images) != len(figures):
        problems.append(f"{len(images)} images on the page, expected {len(figures)}")
    for image, (caption, name) in zip(images, figures):
        if Path(image["src"]).name != name:
            problems.append(f"image {image['src']} found where {name} was expected")
        if not image["width"] > 0:
            problems.append(f"image {name} did not load (naturalWidth {image['width']})")
        if image["caption"] != caption:
            problems.append(f"image {name} follows {image['caption']!r}, expected {caption!r}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=ROOT / "docs" / "_build" / "html")
    parser.add_argument("--screenshot", type=Path, default=None,
                        help="where to save a full-page screenshot")
    args = parser.parse_args(argv)
    problems = check(args.html, args.screenshot)
    for problem in problems:
        print("FAIL:", problem)
    if not problems:
        headings, figures = expected_page()
        print(f"ok: {len(headings)} headings in order, {len(figures)} images loaded")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
