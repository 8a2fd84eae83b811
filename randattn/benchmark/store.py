"""Results files of the attention benchmark: JSON with metadata, written point by point.

A results file holds ``setup`` (what identifies a sweep: grid, measurement budget, device, versions
and a fingerprint of the library's source), ``metadata`` (GPU name, versions, dates, git revision)
and ``points`` (one record per measured :class:`~randattn.benchmark.grid.Point`). Every finished
point is written at once (atomically), so a killed sweep resumes where it stopped: a sweep with the
same ``setup`` skips the points already in the file; a sweep with another setup starts afresh and
replaces the file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

from .grid import Grid, Point

FORMAT_VERSION = 1
_PACKAGE_DIR = Path(__file__).resolve().parents[1]


def source_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the library's Python sources: changes with the code."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.rglob("*.py")):
        digest.update(str(path.relative_to(_PACKAGE_DIR)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_revision() -> str | None:
    """Git revision of the source tree (``RANDATTN_GIT_REVISION`` overrides), or ``None``."""
    if os.environ.get("RANDATTN_GIT_REVISION"):
        return os.environ["RANDATTN_GIT_REVISION"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=_PACKAGE_DIR, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def device_name(device: torch.device) -> str:
    """Human-readable name of a device, e.g. ``"NVIDIA H100 80GB HBM3"`` or ``"CPU"``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "CPU"


def _versions() -> dict:
    import randattn

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "randattn": getattr(randattn, "__version__", None),
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
    }


def sweep_setup(grid: Grid, device: torch.device, budget: dict) -> dict:
    """The identity of a sweep: results with an equal setup can be resumed or reused."""
    return {
        "grid": grid.to_dict(),
        "budget": budget,
        "device": device_name(device),
        "versions": _versions(),
        "source": source_fingerprint(),
    }


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Results:
    """Contents of a results file.

    Attributes:
        setup: the sweep's identity (see :func:`sweep_setup`).
        metadata: ``device``, ``versions``, ``git_revision``, ``started``, ``updated``,
            ``complete`` and the grid's ``batch_size``/``dtype``/``causal``.
        points: dict point key -> record (the :class:`~randattn.benchmark.grid.Point` fields plus
            the metrics of :func:`randattn.benchmark.timing.measure`).
    """

    def __init__(self, setup: dict, metadata: dict, points: dict[str, dict]) -> None:
        self.setup = setup
        self.metadata = metadata
        self.points = points

    @property
    def grid(self) -> Grid:
        """The grid the results were recorded on."""
        return Grid.from_dict(self.setup["grid"])

    def record(self, point: Point) -> dict | None:
        """The record of a point, or ``None`` if it was not measured."""
        return self.points.get(point.key)

    def to_json(self) -> dict:
        """JSON-friendly form, points in measurement order."""
        return {
            "format": FORMAT_VERSION,
            "setup": self.setup,
            "metadata": self.metadata,
            "points": list(self.points.values()),
        }

    @classmethod
    def from_json(cls, data: dict) -> Results:
        """Inverse of :meth:`to_json`."""
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"unsupported results format {data.get('format')!r}, expected {FORMAT_VERSION}")
        points = {Point(**{k: r[k] for k in Point.__dataclass_fields__}).key: r for r in data["points"]}
        return cls(data["setup"], data["metadata"], points)

    def describe(self) -> str:
        """Where and when the results were recorded, e.g. ``"on NVIDIA H100 ... on 2026-11-23 (...)"``."""
        meta, grid = self.metadata, self.grid
        note = "" if grid.label == "spec" else f"; {grid.label} grid, not the full benchmark"
        return (
            f"on {meta['device']} on {str(meta['updated'])[:10]} (torch "
            f"{meta['versions']['torch']}, randattn {meta['versions']['randattn']}{note})"
        )


def load_results(path: str | os.PathLike) -> Results:
    """Read a results file."""
    with open(path, encoding="utf-8") as f:
        return Results.from_json(json.load(f))


class ResultStore:
    """A results file being filled by a sweep.

    Opening a store whose file holds results of the same ``setup`` keeps them (resume); any other
    file content is replaced once the first new point is written.
    """

    def __init__(self, path: str | os.PathLike, setup: dict) -> None:
        self.path = Path(path)
        previous = None
        if self.path.exists():
            try:
                previous = load_results(self.path)
            except (ValueError, KeyError, TypeError, json.JSONDecodeError):
                previous = None
        if previous is not None and previous.setup == setup:
            self.results = previous
        else:
            grid = setup["grid"]
            metadata = {
                "device": setup["device"],
                "versions": setup["versions"],
                "batch_size": grid["batch_size"],
                "dtype": grid["dtype"],
                "causal": grid["causal"],
                "git_revision": git_revision(),
                "started": _now(),
                "updated": _now(),
                "complete": False,
            }
            self.results = Results(setup, metadata, {})

    def done(self, point: Point) -> bool:
        """Whether the point was already measured."""
        return point.key in self.results.points

    def add(self, point: Point, metrics: dict) -> None:
        """Record a measured point and write the file at once (atomic replace)."""
        record = {
            "model": point.model,
            "embed_dim": point.embed_dim,
            "num_heads": point.num_heads,
            "seq_len": point.seq_len,
            "kernel": point.kernel,
            "num_features": point.num_features,
            **metrics,
        }
        self.results.points[point.key] = record
        self.write()

    def finish(self, complete: bool) -> None:
        """Mark whether every point of the grid is in the file, and write it."""
        if self.results.metadata.get("complete") != complete:
            self.results.metadata["complete"] = complete
            self.write()

    def write(self) -> None:
        """Write the file atomically."""
        self.results.metadata["updated"] = _now()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.results.to_json(), f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
