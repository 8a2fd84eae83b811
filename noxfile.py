"""Sessions: ``tests``, ``lint``, ``docs``.

The torch requirement comes from ``RANDATTN_TORCH`` (default ``torch``) so that CI can pin a CPU build
(``RANDATTN_TORCH=torch==2.13.0``) while users get the normal wheel.
"""

from __future__ import annotations

import os

import nox

nox.options.sessions = ["lint", "tests", "docs"]
nox.options.default_venv_backend = "venv"

TORCH = os.environ.get("RANDATTN_TORCH", "torch")


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (Triton kernels run in the interpreter without a GPU)."""
    session.install(TORCH)
    session.install("-e", ".[test,docs,browser]")
    env = {} if _has_cuda(session) else {"TRITON_INTERPRET": "1"}
    session.run("pytest", *session.posargs, env=env)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff and mypy."""
    session.install(TORCH)
    session.install("-e", ".[dev]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", "randattn")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the site with warnings as errors.

    On a CUDA machine the gallery runs the benchmarks and refreshes the recorded results and figures;
    without one it re-plots from the recorded results in ``docs/_data``.
    """
    session.install(TORCH)
    session.install("-e", ".[docs,triton]")
    session.run("sphinx-build", "-W", "--keep-going", "-b", "html", "docs", "docs/_build/html", *session.posargs)


def _has_cuda(session: nox.Session) -> bool:
    out = session.run("python", "-c", "import torch; print(torch.cuda.is_available())", silent=True)
    return bool(out) and "True" in out
