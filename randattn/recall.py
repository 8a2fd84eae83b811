"""Multi-query associative recall: a synthetic task where random-feature attention is weak.

Each sequence first lists ``num_pairs`` key-value pairs, then asks for ``num_queries`` of the keys
again, each followed by its value::

    k1 v1 k2 v2 ... kP vP  q1 a1 q2 a2 ... qQ aQ      (a_i is the value paired with key q_i)

A causal model reads the sequence and, at each query key, must predict the value that followed
that key earlier. Exact attention can look the key up; a random-feature model has to store all the
pairs in its ``(m, d)`` state, so its accuracy falls as the number of pairs grows relative to ``m``.
Sequences are generated on the fly from a seeded generator: the task has no data files.

The keys are asked without repetition, so a model that has not learned the lookup can still guess
among the values of the pairs not asked yet; :func:`elimination_baseline` is the accuracy of that
guess, the level to beat (not ``1 / num_values``). Training sits on a plateau near that level until
the lookup forms; how long depends strongly on the batch size and the learning rate (more sequences
per step shorten it, too high a learning rate can keep a model on it), which is what the defaults of
:class:`RecallConfig` are set for.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .charlm.model import AttentionSpec, CausalTransformer
from .charlm.train import environment, seconds_per_step

__all__ = [
    "IGNORE_INDEX",
    "RecallTask",
    "elimination_baseline",
    "RecallConfig",
    "TINY_RECALL",
    "DEFAULT_RECALL_STUDY",
    "DEFAULT_RECALL_PAIRS",
    "generate_batch",
    "train_recall",
    "run_recall_study",
]

#: Target id of the positions that are not scored.
IGNORE_INDEX = -100


@dataclass(frozen=True)
class RecallTask:
    """Shape of the task.

    Attributes:
        num_keys: size of the key alphabet (ids ``0 .. num_keys-1``).
        num_values: size of the value alphabet (ids ``num_keys .. num_keys+num_values-1``).
        num_pairs: key-value pairs per sequence (distinct keys, values drawn independently, so
            two keys may share a value).
        num_queries: keys asked per sequence (distinct keys of the pairs, in random order).
    """

    num_keys: int = 64
    num_values: int = 64
    num_pairs: int = 16
    num_queries: int = 16

    def __post_init__(self) -> None:
        if self.num_pairs > self.num_keys:
            raise ValueError(f"num_pairs={self.num_pairs} exceeds num_keys={self.num_keys}")
        if not 1 <= self.num_queries <= self.num_pairs:
            raise ValueError(f"num_queries must be in [1, num_pairs={self.num_pairs}], got {self.num_queries}")
        if self.num_values < 1:
            raise ValueError(f"num_values must be >= 1, got {self.num_values}")

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return self.num_keys + self.num_values

    @property
    def length(self) -> int:
        """Model input length ``2 P + 2 Q - 1``."""
        return 2 * self.num_pairs + 2 * self.num_queries - 1


def elimination_baseline(task: RecallTask) -> float:
    """Expected accuracy of guessing, at the ``i``-th query, uniformly among the values of the
    ``num_pairs - i`` pairs not asked yet: ``mean_i 1 / (num_pairs - i)``.

    This needs no lookup, only the set of values seen and those already answered, so a model has
    learned the task only if it is well above this level. (Repeated values make the guess slightly
    better than this formula.)
    """
    return sum(1.0 / (task.num_pairs - i) for i in range(task.num_queries)) / task.num_queries


def generate_batch(
    task: RecallTask, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of recall sequences.

    Returns:
        ``inputs`` ``(B, T)`` int64 and ``targets`` ``(B, T)`` int64 with ``T = task.length``;
        ``targets[b, t]`` is the value asked for when ``inputs[b, t]`` is a query key, and
        :data:`IGNORE_INDEX` elsewhere.
    """
    p, q = task.num_pairs, task.num_queries
    keys = torch.argsort(torch.rand(batch_size, task.num_keys, generator=generator), dim=1)[:, :p]
    values = task.num_keys + torch.randint(0, task.num_values, (batch_size, p), generator=generator)
    asked = torch.argsort(torch.rand(batch_size, p, generator=generator), dim=1)[:, :q]
    query_keys = keys.gather(1, asked)
    answers = values.gather(1, asked)
    seq = torch.cat(
        [torch.stack([keys, values], dim=2).flatten(1), torch.stack([query_keys, answers], dim=2).flatten(1)], dim=1
    )
    inputs = seq[:, :-1]
    targets = torch.full_like(inputs, IGNORE_INDEX)
    query_pos = 2 * p + 2 * torch.arange(q)
    targets[:, query_pos] = answers
    return inputs, targets


@dataclass(frozen=True)
class RecallConfig:
    """Training settings of the recall study (shared by every model).

    The defaults (1024 sequences per step, learning rate ``1e-3``) are set so that exact attention
    gets past the plateau at :func:`elimination_baseline` well within the steps at the pair counts of
    :data:`DEFAULT_RECALL_PAIRS`; with 256 sequences per step and a learning rate of ``3e-3``, exact
    attention stayed on the plateau for 2000 steps at 8 pairs.

    Attributes:
        task: :class:`RecallTask`.
        d_model, n_layers, n_heads: model size.
        batch_size, steps, lr, warmup, weight_decay: AdamW with warmup and cosine decay.
        eval_batches: batches of the final accuracy.
        seed: training sequences; the evaluation sequences use ``seed + 1``.
        init_seed, feature_seed: initialisation and projections.
        device, bf16: where to train, bfloat16 autocast on CUDA.
    """

    task: RecallTask = RecallTask()
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 2
    batch_size: int = 1024
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.1
    eval_batches: int = 16
    seed: int = 0
    init_seed: int = 0
    feature_seed: int = 1000
    device: str = "cpu"
    bf16: bool = False


#: A CPU-sized configuration for tests and the documentation build.
TINY_RECALL = RecallConfig(
    task=RecallTask(num_keys=16, num_values=16, num_pairs=4, num_queries=4),
    d_model=32,
    n_heads=2,
    batch_size=16,
    steps=30,
    lr=3e-3,
    warmup=5,
    eval_batches=2,
)


def _lr_at(step: int, config: RecallConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _scores(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, config: RecallConfig):
    dev = torch.device(config.device)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.bf16 and dev.type == "cuda"):
        logits = model(inputs)
    logits = logits.float()
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    scored = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & scored
    return loss, correct.sum(), scored.sum()


def train_recall(config: RecallConfig, spec: AttentionSpec, *, progress: Callable[[str], None] | None = None) -> dict:
    """Train one model on the recall task and measure its accuracy on fresh sequences.

    Returns:
        ``dict`` with ``attention``, ``kind``, ``num_features``, ``accuracy`` (fraction of query
        keys answered correctly), ``eval_loss``, ``final_train_loss``, ``seconds``.
    """
    torch.manual_seed(config.seed)
    task = config.task
    model = CausalTransformer(
        task.vocab_size,
        task.length,
        d_model=config.d_model,
        n_layers=config.n_layers,
        n_heads=config.n_heads,
        attention=spec,
        init_seed=config.init_seed,
        feature_seed=config.feature_seed,
    ).to(config.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )
    gen = torch.Generator().manual_seed(config.seed)
    sync = torch.cuda.synchronize if torch.device(config.device).type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    loss = torch.zeros(())
    model.train()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        inputs, targets = generate_batch(task, config.batch_size, gen)
        loss, _, _ = _scores(model, inputs.to(config.device), targets.to(config.device), config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if progress and (step + 1) % max(1, config.steps // 4) == 0:
            progress(f"recall {spec.label}: step {step + 1}/{config.steps} loss {loss.item():.4f}")
    sync()
    seconds = time.perf_counter() - start
    model.eval()
    eval_gen = torch.Generator().manual_seed(config.seed + 1)
    total_loss, correct, scored = 0.0, 0, 0
    with torch.no_grad():
        for _ in range(config.eval_batches):
            inputs, targets = generate_batch(task, config.batch_size, eval_gen)
            batch_loss, c, s = _scores(model, inputs.to(config.device), targets.to(config.device), config)
            total_loss += batch_loss.item()
            correct += int(c)
            scored += int(s)
    m = getattr(model.attention_layers()[0], "num_random_features", None)
    return {
        "attention": spec.label if spec.kind == "exact" else f"{spec.kind} m={m}",
        "kind": spec.kind,
        "num_features": m,
        "accuracy": correct / scored,
        "eval_loss": total_loss / config.eval_batches,
        "final_train_loss": loss.item(),
        "seconds": seconds,
    }


#: Attention variants of the full recall study.
DEFAULT_RECALL_STUDY = ("exact", "softmax:64", "softmax:256", "relu:64")
#: Numbers of key-value pairs swept by the full recall study (every key asked).
DEFAULT_RECALL_PAIRS = (4, 8)


def _recall_step_seconds(config: RecallConfig, spec: AttentionSpec, steps: int = 10) -> float:
    def loop_seconds(n: int) -> float:
        return train_recall(replace(config, steps=n, eval_batches=1, warmup=1), spec)["seconds"]

    return seconds_per_step(loop_seconds, steps)


def run_recall_study(
    config: RecallConfig,
    specs: Sequence[AttentionSpec | str] = DEFAULT_RECALL_STUDY,
    *,
    num_pairs: Sequence[int] | None = None,
    time_budget_s: float | None = None,
    out_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Train every variant on the task (optionally for several numbers of pairs).

    Args:
        config: shared :class:`RecallConfig`.
        specs: attention variants (:class:`~randattn.charlm.model.AttentionSpec` or strings).
        num_pairs: numbers of key-value pairs to sweep (each with ``num_queries = num_pairs``, and
            ``num_keys`` raised to at least ``num_pairs``); default: the config's task only.
        time_budget_s: if given, lower ``config.steps`` (same for every run) so that the whole
            study fits this many seconds, from measured step times.
        out_path: JSON file rewritten after each model.
        progress: called with progress lines.

    Returns:
        ``{"settings", "environment", "results"}``; each result also has ``num_pairs``.
    """
    parsed = [AttentionSpec.parse(s) if isinstance(s, str) else s for s in specs]
    base = config.task
    tasks = (
        [base] if num_pairs is None else [RecallTask(max(base.num_keys, p), base.num_values, p, p) for p in num_pairs]
    )
    if time_budget_s is not None:
        per_step = sum(_recall_step_seconds(replace(config, task=t), s) for t in tasks for s in parsed)
        steps = max(100, min(config.steps, int(time_budget_s / per_step) // 100 * 100))
        config = replace(config, steps=steps)
        if progress:
            progress(f"time budget {time_budget_s:.0f} s -> {steps} steps per model")
    study: dict = {"settings": asdict(config), "environment": environment(config.device), "results": []}
    for task in tasks:
        run_config = replace(config, task=task)
        for spec in parsed:
            record = train_recall(run_config, spec, progress=progress)
            record["num_pairs"] = task.num_pairs
            study["results"].append(record)
            if out_path is not None:
                Path(out_path).parent.mkdir(parents=True, exist_ok=True)
                Path(out_path).write_text(json.dumps(study, indent=1) + "\n")
    return study
