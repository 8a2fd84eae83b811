"""The documentation site: a warning-free build from the recorded results, and the benchmark page in a browser."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
from PIL import Image

from randattn.benchmark import figures, load_results
from randattn.benchmark.site import FIGURE_DIR, RESULTS_FILE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
check_site = importlib.import_module("check_site")

PUBLIC_MODULES = ["randattn", "randattn.functional", "randattn.features", "randattn.benchmark",
                  "randattn.fidelity", "randattn.decoding", "randattn.distributed"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site built with ``-W`` (warnings are errors), re-plotting the recorded results."""
    for package in ("sphinx", "sphinx_gallery", "furo"):
        pytest.importorskip(package)
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "RANDATTN_BENCHMARK_RECORD": "0"}
    proc = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html",
                           "docs", str(out / "html"), "-d", str(out / "doctrees")],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return out / "html"


def test_benchmark_page_shows_the_recorded_figures(site):
    html = (site / "benchmarks" / "attention.html").read_text(encoding="utf-8")
    results = load_results(RESULTS_FILE)
    assert f"re-plotted from results recorded {results.describe()}" in html.replace("&#39;", "'")
    for spec in figures():
        assert f'src="../_images/{spec.filename}"' in html
        built = site / "_images" / spec.filename
        with Image.open(built) as image, Image.open(FIGURE_DIR / spec.filename) as source:
            assert image.text["Title"] == spec.caption
            assert image.size == source.size
    assert html.index(figures()[0].caption) < html.index(figures()[-1].caption)


def test_every_page_carries_the_recording_banner(site):
    for page in ("index.html", "api.html", "user_guide/index.html", "gallery/index.html"):
        assert "re-plotted from results recorded on" in (site / page).read_text(encoding="utf-8")


def test_api_reference_documents_every_public_name(site):
    html = (site / "api.html").read_text(encoding="utf-8")
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            if name.startswith("__") or isinstance(getattr(module, name), types.ModuleType):
                continue
            if f'id="{module_name}.{name}"' not in html:
                missing.append(f"{module_name}.{name}")
    assert missing == []


def test_gallery_has_the_benchmark_scripts(site):
    gallery = site / "gallery" / "benchmarks"
    scripts = sorted(p.stem for p in (ROOT / "examples" / "benchmarks").glob("plot_*.py"))
    assert len(scripts) == 9
    for stem in scripts:
        assert (gallery / f"{stem}.html").exists()


@pytest.mark.skipif(not Path(check_site.CHROMIUM).exists(), reason="no chromium at /usr/bin/chromium")
def test_benchmark_page_in_a_real_browser(site, tmp_path):
    pytest.importorskip("playwright")
    shot = tmp_path / "attention.png"
    assert check_site.check(site, shot) == []
    with Image.open(shot) as image:
        assert image.width == 1280 and image.height > 5000  # the full page with its 32 figures


def test_expected_page_matches_the_numbering():
    headings, pairs = check_site.expected_page()
    assert headings[0] == "Randomized Multi-Head Attention" and len(headings) == 1 + 8
    assert pairs == [(spec.caption, spec.filename) for spec in figures()]
