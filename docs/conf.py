"""Sphinx configuration of the randattn documentation."""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # build from a checkout without installing

import randattn  # noqa: E402
from randattn.benchmark import load_results  # noqa: E402
from randattn.benchmark.grid import BATCH_SIZE, DTYPE, DTYPE_LABELS  # noqa: E402
from randattn.benchmark.site import RESULTS_FILE  # noqa: E402
from randattn.benchmark.sweep import records_here  # noqa: E402
from randattn.benchmark.timing import DEFAULT_BUDGET  # noqa: E402

project = "randattn"
author = "randattn developers"
copyright = "2026, randattn developers"
release = version = randattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
]
exclude_patterns = ["_build", "_data", "gallery/**/*.ipynb"]
nitpicky = False
# Settings of the recorded benchmark, stated on the benchmark page.
rst_epilog = "\n".join(f".. |bench_{name}| replace:: {value}" for name, value in {
    "batch": BATCH_SIZE, "dtype": DTYPE_LABELS[DTYPE], "warmup": DEFAULT_BUDGET.warmup,
    "target_ms": f"{DEFAULT_BUDGET.target_ms:g}", "max_repeats": DEFAULT_BUDGET.max_repeats,
    "min_repeats": DEFAULT_BUDGET.min_repeats}.items())
autodoc_member_order = "bysource"
autodoc_typehints = "description"
napoleon_google_docstring = True
napoleon_numpy_docstring = False

sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "gallery",
    "filename_pattern": r"/plot_",
    "subsection_order": ["../examples/benchmarks", "*"],
    "within_subsection_order": "FileNameSortKey",
    "download_all_examples": False,
    "abort_on_example_error": True,
    "image_scrapers": ("matplotlib",),
    "matplotlib_animations": False,
    "min_reported_time": 1,
}

html_theme = "furo"
html_title = f"randattn {release}"
html_static_path = ["_static"]
html_theme_options = {
    "light_css_variables": {"color-brand-primary": "#1f5fa8", "color-brand-content": "#1f5fa8"},
    "dark_css_variables": {"color-brand-primary": "#7fb3ff", "color-brand-content": "#7fb3ff"},
}


def _announce_recording(app, pagename, templatename, context, doctree):
    """Banner naming the GPU and date of the benchmark results (read after the gallery ran)."""
    if not hasattr(app, "randattn_recording"):
        results = load_results(RESULTS_FILE)
        how = "measured during this build" if records_here() else "re-plotted from results recorded"
        app.randattn_recording = f"Benchmark figures {how} {results.describe()}."
    context["theme_announcement"] = app.randattn_recording


def setup(app):
    app.connect("html-page-context", _announce_recording)
