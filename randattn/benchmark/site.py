"""Where the documentation site keeps the benchmark's recorded results and figures.

Paths inside a source checkout (``docs/`` beside the ``randattn`` package), shared by the gallery
scripts and the Sphinx configuration.
"""

from pathlib import Path

#: The ``docs/`` folder of the checkout.
DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"
#: Recorded results of the attention benchmark (rewritten by a sweep on a GPU).
RESULTS_FILE = DOCS_DIR / "_data" / "benchmark" / "attention.json"
#: Folder of the figures ``<N>.png`` of the benchmark page.
FIGURE_DIR = DOCS_DIR / "_static"
