"""Train exact and random-feature attention side by side and record the results as JSON.

Training parity (character-level language model on the CPython standard library sources)::

    python scripts/train_parity.py --out parity.json                 # full study (GPU recommended)
    python scripts/train_parity.py --tiny --out parity_tiny.json     # seconds on a CPU

Studies of the same settings run one variant each (side by side on one GPU), then merged::

    python scripts/train_parity.py --specs exact --out part0.json
    python scripts/train_parity.py --specs softmax:256 --no-layer-errors --out part1.json
    python scripts/train_parity.py --merge part0.json part1.json --out parity.json

Multi-query associative recall::

    python scripts/train_parity.py --recall --out recall.json
    python scripts/train_parity.py --recall --tiny --out recall_tiny.json
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from randattn.charlm.train import DEFAULT_STUDY, TINY_STUDY, TrainConfig, merge_studies, run_parity_study
from randattn.recall import DEFAULT_RECALL_PAIRS, DEFAULT_RECALL_STUDY, TINY_RECALL, RecallConfig, run_recall_study

#: ``m`` values at which the trained exact model's layers are compared with random-feature attention.
LAYER_ERROR_FEATURES = (16, 32, 64, 128, 256, 512, 1024)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recall", action="store_true", help="run the associative-recall study instead")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized settings (seconds)")
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA only)")
    parser.add_argument("--steps", type=int, help="training steps per model (upper bound with --time-budget)")
    parser.add_argument("--time-budget", type=float, help="seconds for all models; lowers --steps to fit")
    parser.add_argument("--specs", nargs="+", help="attention variants, e.g. exact softmax:128 relu:64")
    parser.add_argument("--pairs", type=int, nargs="+", help="recall: numbers of key-value pairs to sweep")
    parser.add_argument(
        "--set",
        dest="overrides",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="override settings, e.g. --set d_model=64 n_layers=2 (TrainConfig / RecallConfig fields)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's choice; 1 with --tiny, where more only add overhead)",
    )
    parser.add_argument("--no-layer-errors", action="store_true", help="parity: skip the trained-layer errors")
    parser.add_argument(
        "--merge", nargs="+", type=Path, metavar="JSON", help="merge parity studies of the same settings into --out"
    )
    return parser.parse_args(argv)


def apply_overrides(config, overrides: list[str]):
    """``dataclasses.replace`` with ``FIELD=VALUE`` strings, values converted to the field's type."""
    changes = {}
    for item in overrides:
        name, sep, value = item.partition("=")
        if not sep or not hasattr(config, name):
            raise SystemExit(f"error: --set expects FIELD=VALUE with a field of {type(config).__name__}, got {item!r}")
        current = getattr(config, name)
        if isinstance(current, bool):
            changes[name] = value.lower() in ("1", "true", "yes")
        elif current is None or isinstance(current, int):
            changes[name] = None if value.lower() == "none" else int(value)
        elif isinstance(current, float):
            changes[name] = float(value)
        else:
            changes[name] = value
    return replace(config, **changes)


def print_parity(study: dict) -> None:
    for row in study["parity"]:
        flag = "within" if row["within"] else "outside"
        print(
            f"{row['attention']:>16}  final val loss {row['final_val_loss']:.4f}  x{row['ratio']:.4f}  ({flag} tolerance)"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.merge:
        study = merge_studies([json.loads(path.read_text()) for path in args.merge])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(study, indent=1, allow_nan=True) + "\n")
        print_parity(study)
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda requested but CUDA is not available", file=sys.stderr)
        return 2
    threads = args.threads or (1 if args.tiny else None)
    if threads:
        torch.set_num_threads(threads)
    if args.recall:
        config: RecallConfig = TINY_RECALL if args.tiny else RecallConfig()
        config = apply_overrides(replace(config, device=args.device, bf16=args.bf16), args.overrides)
        if args.steps:
            config = replace(config, steps=args.steps)
        study = run_recall_study(
            config,
            args.specs or (["exact", "softmax:16"] if args.tiny else list(DEFAULT_RECALL_STUDY)),
            num_pairs=args.pairs or (None if args.tiny else list(DEFAULT_RECALL_PAIRS)),
            time_budget_s=args.time_budget,
            out_path=args.out,
            progress=print,
        )
        for r in study["results"]:
            print(f"pairs {r['num_pairs']:4d}  {r['attention']:>16}  accuracy {r['accuracy']:.3f}")
        return 0
    config_p: TrainConfig = TINY_STUDY if args.tiny else TrainConfig()
    config_p = apply_overrides(replace(config_p, device=args.device, bf16=args.bf16), args.overrides)
    if args.steps:
        config_p = replace(config_p, steps=args.steps)
    study = run_parity_study(
        config_p,
        args.specs or (["exact", "softmax:16", "relu:16"] if args.tiny else list(DEFAULT_STUDY)),
        out_path=args.out,
        time_budget_s=args.time_budget,
        fidelity_features=() if args.no_layer_errors else ((16, 64) if args.tiny else LAYER_ERROR_FEATURES),
        progress=print,
    )
    print_parity(study)
    print(json.dumps({"out": str(args.out), "steps": study["settings"]["steps"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
