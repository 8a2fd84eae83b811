"""Command line of the attention benchmark.

``python -m randattn.benchmark sweep [--quick] [--output FILE]`` measures a grid (resuming an
interrupted sweep), ``python -m randattn.benchmark plot --results FILE --out-dir DIR`` draws the
page's figures ``DIR/<N>.png`` from a results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from .grid import QUICK_GRID, SPEC_GRID
from .plot import write_figures
from .store import load_results
from .sweep import run_sweep
from .timing import DEFAULT_BUDGET, QUICK_BUDGET

DEFAULT_OUTPUT = "attention-benchmark.json"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m randattn.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    sweep = commands.add_parser("sweep", help="measure a grid and store the results (resumable)")
    sweep.add_argument("--output", default=DEFAULT_OUTPUT, help="results JSON file")
    sweep.add_argument(
        "--quick", action="store_true", help="small CPU grid (short sequences, batch 1, fp32) for smoke tests"
    )
    sweep.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    sweep.add_argument(
        "--dtype", choices=("bfloat16", "float32"), default=None, help="bfloat16 (autocast, default) or float32"
    )
    sweep.add_argument("--batch-size", type=int, default=None)
    for axis in ("embed_dims", "kernels", "num_heads", "num_features", "seq_lens"):
        sweep.add_argument(
            "--" + axis.replace("_", "-"),
            nargs="+",
            default=None,
            type=str if axis == "kernels" else int,
            help=f"override the grid's {axis}",
        )
    sweep.add_argument(
        "--target-ms", type=float, default=None, help="repeat each pass until its runs add up to this time (ms)"
    )
    sweep.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    sweep.add_argument("--plot", metavar="DIR", default=None, help="then write the figures to DIR")

    warm = commands.add_parser("prewarm", help="compile the grid's Triton kernels in parallel processes (CUDA)")
    warm.add_argument("--processes", type=int, default=8)

    plot = commands.add_parser("plot", help="draw the figures <N>.png from a results file")
    plot.add_argument("--results", default=DEFAULT_OUTPUT, help="results JSON file")
    plot.add_argument("--out-dir", required=True, help="folder of the figures")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "sweep":
        grid = QUICK_GRID if args.quick else SPEC_GRID
        budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
        changes: dict[str, Any] = {
            k: tuple(v)
            for k in ("embed_dims", "kernels", "num_heads", "num_features", "seq_lens")
            if (v := getattr(args, k)) is not None
        }
        if args.dtype is not None:
            changes["dtype"] = args.dtype
        if args.batch_size is not None:
            changes["batch_size"] = args.batch_size
        if changes:
            changes["label"] = "custom"
        grid = dataclasses.replace(grid, **changes)
        if args.target_ms is not None:
            budget = dataclasses.replace(budget, target_ms=args.target_ms)
        device = args.device if args.device is not None else ("cpu" if args.quick else None)
        results = run_sweep(args.output, grid, device=device, budget=budget, progress=not args.no_progress)
        records = results.points.values()
        failures = sum(1 for r in records if r["failure"])
        seconds = sum(r.get("seconds", 0.0) for r in records)
        print(
            f"{len(records)} points ({failures} failed, {seconds:.0f} s of measuring) in "
            f"{args.output}, recorded {results.describe()}"
        )
        if args.plot:
            print(f"{len(write_figures(results, args.plot))} figures in {args.plot}")
    elif args.command == "prewarm":
        from .prewarm import prewarm

        for error in prewarm(processes=args.processes):
            print("prewarm:", error)
    else:
        paths = write_figures(load_results(args.results), args.out_dir)
        print(f"{len(paths)} figures in {args.out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
