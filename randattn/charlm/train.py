"""Training loop and the training-parity study (exact vs random-feature attention)."""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..fidelity import layer_approximation_error
from ..functional import triton_available
from .corpus import CharCorpus, batch_starts, get_batch, load_stdlib_corpus
from .model import AttentionSpec, CausalTransformer

__all__ = [
    "PARITY_TOLERANCE",
    "DEFAULT_STUDY",
    "TINY_STUDY",
    "TrainConfig",
    "environment",
    "train_model",
    "measure_step_seconds",
    "seconds_per_step",
    "steps_for_budget",
    "run_parity_study",
    "merge_studies",
    "parity_table",
    "trained_layer_errors",
]

#: Target of the study: a random-feature model whose final validation loss is within this
#: fraction of exact attention's passes.
PARITY_TOLERANCE = 0.05


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run (shared by every model of a study).

    Attributes:
        d_model, n_layers, n_heads, context: model size and sequence length.
        batch_size, steps: sequences per step and number of optimizer steps.
        lr, warmup, weight_decay, grad_clip: AdamW with linear warmup then cosine decay to ``lr/10``.
        eval_every, eval_batches: validation-loss curve points and the batches each uses.
        final_eval_batches: batches of the final validation loss.
        seed: data order (training windows) and validation windows.
        init_seed, feature_seed: parameter initialisation and random projections.
        max_train_chars, max_val_chars: corpus truncation (``None``: whole splits).
        short_conv: kernel size of the causal depthwise convolution over every block's attention
            inputs (``short_conv`` of :class:`~randattn.charlm.model.CausalTransformer`); ``0``: none.
        device: ``"cpu"``, ``"cuda"``, ...
        bf16: bfloat16 autocast (CUDA only).
    """

    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    context: int = 256
    batch_size: int = 64
    steps: int = 2500
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 8
    final_eval_batches: int = 64
    seed: int = 0
    init_seed: int = 0
    feature_seed: int = 1000
    max_train_chars: int | None = None
    max_val_chars: int | None = None
    short_conv: int = 0
    device: str = "cpu"
    bf16: bool = False


#: Attention variants of the full study (``@250``: features redrawn every 250 training steps).
DEFAULT_STUDY = ("exact", "softmax:64", "softmax:256", "softmax:256@250", "relu:256")

#: A CPU-sized configuration (seconds) for tests and the documentation build.
TINY_STUDY = TrainConfig(
    d_model=32,
    n_layers=2,
    n_heads=2,
    context=64,
    batch_size=8,
    steps=40,
    lr=3e-3,
    warmup=5,
    eval_every=20,
    eval_batches=2,
    final_eval_batches=4,
    max_train_chars=200_000,
    max_val_chars=50_000,
)


def environment(device: str) -> dict:
    """Where a result was produced: device name, backend of random-feature attention (what
    ``backend="auto"`` picks there), library versions, date (UTC)."""
    dev = torch.device(device)
    name = (
        torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({platform.processor() or platform.machine()})"
    )
    return {
        "device": name,
        "rand_attention_backend": "triton" if dev.type == "cuda" and triton_available() else "reference",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def _lr_at(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _autocast(config: TrainConfig):
    dev = torch.device(config.device)
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16 and dev.type == "cuda")


def build_model(config: TrainConfig, spec: AttentionSpec, vocab_size: int) -> CausalTransformer:
    """The study's model for one attention variant, on ``config.device``."""
    model = CausalTransformer(
        vocab_size,
        config.context,
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        attention=spec,
        init_seed=config.init_seed,
        feature_seed=config.feature_seed,
        short_conv=config.short_conv,
    )
    return model.to(config.device)


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate(model: CausalTransformer, data: torch.Tensor, starts: torch.Tensor, config: TrainConfig) -> float:
    """Mean cross-entropy (nats per character) over the windows ``starts`` ``(num_batches, B)``."""
    model.eval()
    total = 0.0
    for batch in starts:
        x, y = get_batch(data, batch, config.context)
        x, y = x.to(config.device), y.to(config.device)
        with _autocast(config):
            logits = model(x)
        total += nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten()).item()
    model.train()
    return total / len(starts)


def train_model(
    config: TrainConfig,
    spec: AttentionSpec,
    corpus: CharCorpus,
    *,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train one model and return its record.

    Every model trained with the same ``config`` and ``corpus`` sees the same batches in the same
    order, starts from the same weights (apart from its random projections) and is evaluated on the
    same validation windows.

    Returns:
        ``dict`` with ``attention`` (label), ``kind``, ``num_features`` (``m`` actually used, or
        ``None``), ``curve`` (list of ``{"step", "train_loss", "val_loss"}``), ``final_val_loss``,
        ``diverged``, ``seconds``, ``seconds_per_step`` and ``parameters``.
    """
    torch.manual_seed(config.seed)
    model = build_model(config, spec, corpus.vocab_size)
    optimizer = _optimizer(model, config)
    train_starts = batch_starts(corpus.train.numel(), config.context, config.batch_size, config.steps, config.seed)
    eval_starts = batch_starts(
        corpus.val.numel(), config.context, config.batch_size, config.eval_batches, config.seed + 1
    )
    final_starts = batch_starts(
        corpus.val.numel(), config.context, config.batch_size, config.final_eval_batches, config.seed + 2
    )
    curve: list[dict] = []
    recent: list[torch.Tensor] = []
    diverged = False
    model.train()
    sync = torch.cuda.synchronize if torch.device(config.device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        x, y = get_batch(corpus.train, train_starts[step], config.context)
        x, y = x.to(config.device, non_blocking=True), y.to(config.device, non_blocking=True)
        with _autocast(config):
            logits = model(x)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        recent.append(loss.detach())
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            train_loss = torch.stack(recent).float().mean().item()
            recent = []
            if not math.isfinite(train_loss):
                diverged = True
                if progress:
                    progress(f"{spec.label}: loss is not finite at step {step + 1}; stopping")
                break
            val_loss = evaluate(model, corpus.val, eval_starts, config)
            curve.append({"step": step + 1, "train_loss": train_loss, "val_loss": val_loss})
            if progress:
                progress(f"{spec.label}: step {step + 1}/{config.steps} train {train_loss:.4f} val {val_loss:.4f}")
    sync()
    seconds = time.perf_counter() - start
    final = math.nan if diverged else evaluate(model, corpus.val, final_starts, config)
    layers = model.attention_layers()
    m = getattr(layers[0], "num_random_features", None)
    return {
        "attention": spec.label
        if spec.kind == "exact"
        else AttentionSpec(spec.kind, m, spec.redraw_interval, spec.local_window).label,
        "kind": spec.kind,
        "num_features": m,
        "curve": curve,
        "final_val_loss": final,
        "diverged": diverged,
        "seconds": seconds,
        "seconds_per_step": seconds / max(1, len(curve) and curve[-1]["step"]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "model": model,
    }


def seconds_per_step(loop_seconds: Callable[[int], float], steps: int = 10) -> float:
    """Seconds per step from ``loop_seconds(n)`` (the time of an ``n``-step run), without start-up
    costs: a first short run compiles kernels and fills caches, then the difference between a run of
    ``steps + 3`` steps and one of ``3`` steps."""
    loop_seconds(3)
    short = loop_seconds(3)
    return max(loop_seconds(steps + 3) - short, 1e-6) / steps


def measure_step_seconds(config: TrainConfig, spec: AttentionSpec, corpus: CharCorpus, steps: int = 10) -> float:
    """Seconds per training step of one variant (see :func:`seconds_per_step`)."""

    def loop_seconds(n: int) -> float:
        probe = replace(config, steps=n, eval_every=10**9, final_eval_batches=1, warmup=1)
        return train_model(probe, spec, corpus)["seconds"]

    return seconds_per_step(loop_seconds, steps)


def steps_for_budget(
    config: TrainConfig, specs: Sequence[AttentionSpec], corpus: CharCorpus, budget_s: float, *, multiple: int = 100
) -> int:
    """The largest step count (a multiple of ``multiple``, at most ``config.steps``) whose training of
    every variant fits ``budget_s`` seconds, from measured step times."""
    per_step = sum(measure_step_seconds(config, spec, corpus) for spec in specs)
    steps = int(budget_s / per_step) // multiple * multiple
    return max(multiple, min(config.steps, steps))


def trained_layer_errors(
    model: CausalTransformer,
    tokens: torch.Tensor,
    num_features: Sequence[int],
    *,
    kernels: Sequence[str] = ("softmax", "relu"),
    draws: Sequence[str] = ("orthogonal", "iid"),
    seeds: int = 4,
) -> list[dict]:
    """Approximation error of each exact attention layer of a trained model on real inputs.

    The inputs of every ``nn.MultiheadAttention`` layer are captured while the model runs on
    ``tokens`` ``(B, T)``; each layer is then compared with random-feature attention (causal) with
    its weights, for every ``m``, kernel and draw.

    Returns:
        rows ``{"layer", "num_features", "kernel_fn", "draw", **ErrorStats.as_dict()}``.
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.attention_layers()):
        if not isinstance(layer, nn.MultiheadAttention):
            raise TypeError("trained_layer_errors needs a model with exact (nn.MultiheadAttention) layers")
        handles.append(
            layer.register_forward_pre_hook(lambda mod, args, i=i: captured.__setitem__(i, args[0].detach()))
        )
    try:
        with torch.no_grad():
            model.eval()
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    rows = []
    for i, layer in enumerate(model.attention_layers()):
        x = captured[i].float()
        layer = layer.float()
        for kernel_fn in kernels:
            for draw in draws:
                for m in num_features:
                    stats = layer_approximation_error(
                        layer, x, num_features=m, kernel_fn=kernel_fn, draw=draw, causal=True, seeds=seeds
                    )
                    rows.append(
                        {"layer": i, "num_features": m, "kernel_fn": kernel_fn, "draw": draw, **stats.as_dict()}
                    )
    return rows


def parity_table(results: Sequence[dict], tolerance: float = PARITY_TOLERANCE) -> list[dict]:
    """Final losses relative to exact attention: ``{"attention", "final_val_loss", "ratio", "within"}`` rows."""
    exact = [r for r in results if r["kind"] == "exact"]
    if not exact:
        raise ValueError("results contain no exact-attention run")
    ref = exact[0]["final_val_loss"]
    rows = []
    for r in results:
        ratio = r["final_val_loss"] / ref
        rows.append(
            {
                "attention": r["attention"],
                "final_val_loss": r["final_val_loss"],
                "ratio": ratio,
                "within": bool(math.isfinite(ratio) and ratio <= 1 + tolerance),
            }
        )
    return rows


def run_parity_study(
    config: TrainConfig,
    specs: Sequence[AttentionSpec | str] = DEFAULT_STUDY,
    *,
    corpus: CharCorpus | None = None,
    out_path: str | Path | None = None,
    time_budget_s: float | None = None,
    fidelity_features: Sequence[int] = (),
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train every variant with the same settings and collect the results.

    Args:
        config: shared :class:`TrainConfig`.
        specs: attention variants (:class:`AttentionSpec` or strings for :meth:`AttentionSpec.parse`);
            the first exact one is the reference.
        corpus: the corpus (default: :func:`load_stdlib_corpus` with the config's truncation).
        out_path: JSON file rewritten after each model (so an interrupted study keeps its results).
        time_budget_s: if given, lower ``config.steps`` so that all variants fit this many seconds
            (measured step times; the same step count for every variant).
        fidelity_features: ``m`` values at which the trained exact model's layers are compared with
            random-feature attention (:func:`trained_layer_errors`); empty to skip.
        progress: called with one line of text per curve point.

    Returns:
        ``{"settings", "corpus", "environment", "results", "parity", "tolerance", "layer_errors"}``
        (JSON-serialisable).
    """
    parsed = [AttentionSpec.parse(s) if isinstance(s, str) else s for s in specs]
    if corpus is None:
        corpus = load_stdlib_corpus(max_train_chars=config.max_train_chars, max_val_chars=config.max_val_chars)
    if time_budget_s is not None:
        steps = steps_for_budget(config, parsed, corpus, time_budget_s)
        config = replace(config, steps=steps, eval_every=min(config.eval_every, max(1, steps // 8)))
        if progress:
            progress(f"time budget {time_budget_s:.0f} s -> {steps} steps per model")
    study: dict = {
        "settings": asdict(config),
        "corpus": corpus.summary(),
        "environment": environment(config.device),
        "tolerance": PARITY_TOLERANCE,
        "results": [],
        "parity": [],
        "layer_errors": [],
    }

    def save() -> None:
        if out_path is not None:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(study, indent=1, allow_nan=True) + "\n")

    for spec in parsed:
        record = train_model(config, spec, corpus, progress=progress)
        model = record.pop("model")
        study["results"].append(record)
        if spec.kind == "exact" and fidelity_features and not study["layer_errors"]:
            x, _ = get_batch(
                corpus.val, batch_starts(corpus.val.numel(), config.context, 4, 1, config.seed + 3)[0], config.context
            )
            try:
                study["layer_errors"] = trained_layer_errors(model, x.to(config.device), fidelity_features)
            except Exception as exc:  # the training results matter more than this measurement
                study["layer_errors_failure"] = f"{type(exc).__name__}: {exc}"
                if progress:
                    progress(f"trained-layer errors failed: {study['layer_errors_failure']}")
        if any(r["kind"] == "exact" for r in study["results"]):
            study["parity"] = parity_table(study["results"])
        save()
        del model
    return study


def merge_studies(studies: Sequence[dict]) -> dict:
    """One study from studies of the same settings and corpus that trained different variants (for
    example one process per variant, run side by side): their results in the given order, the first
    trained-layer errors found and the parity table over all of them.

    Raises:
        ValueError: no studies, or studies with different settings or corpora.
    """
    if not studies:
        raise ValueError("merge_studies needs at least one study")
    first = studies[0]
    for other in studies[1:]:
        for key in ("settings", "corpus"):
            if other[key] != first[key]:
                raise ValueError(f"studies differ in {key}: {first[key]} vs {other[key]}")
    merged = {key: value for key, value in first.items() if key not in ("results", "parity", "layer_errors")}
    merged["results"] = [r for study in studies for r in study["results"]]
    merged["layer_errors"] = next((s["layer_errors"] for s in studies if s.get("layer_errors")), [])
    merged["parity"] = parity_table(merged["results"]) if any(r["kind"] == "exact" for r in merged["results"]) else []
    return merged
