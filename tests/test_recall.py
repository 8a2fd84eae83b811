"""Tests of the multi-query associative recall task and its training loop."""

import pytest
import torch

from randattn.recall import (
    IGNORE_INDEX,
    TINY_RECALL,
    RecallConfig,
    RecallTask,
    elimination_baseline,
    generate_batch,
    run_recall_study,
)


@pytest.mark.parametrize("task", [RecallTask(16, 8, 4, 4), RecallTask(64, 64, 16, 5), RecallTask(8, 3, 8, 1)])
def test_generated_sequences_are_correct(task):
    inputs, targets = generate_batch(task, 32, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == (32, task.length)
    assert inputs.dtype == targets.dtype == torch.int64
    p, q = task.num_pairs, task.num_queries
    for seq, tgt in zip(inputs.tolist(), targets.tolist()):
        keys, values = seq[0 : 2 * p : 2], seq[1 : 2 * p : 2]
        assert len(set(keys)) == p and all(0 <= k < task.num_keys for k in keys)
        assert all(task.num_keys <= v < task.vocab_size for v in values)
        table = dict(zip(keys, values))
        asked = seq[2 * p :: 2]
        assert len(asked) == q and len(set(asked)) == q and set(asked) <= set(keys)
        scored = [t for t, y in enumerate(tgt) if y != IGNORE_INDEX]
        assert scored == [2 * p + 2 * i for i in range(q)]
        for t in scored:
            assert tgt[t] == table[seq[t]]  # the value paired with the asked key
            if t + 1 < len(seq):
                assert seq[t + 1] == tgt[t]  # teacher forcing: the answer follows the key


def test_generation_is_seeded():
    task = RecallTask()
    a = generate_batch(task, 4, torch.Generator().manual_seed(1))
    b = generate_batch(task, 4, torch.Generator().manual_seed(1))
    c = generate_batch(task, 4, torch.Generator().manual_seed(2))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_task_validation():
    with pytest.raises(ValueError, match="num_pairs"):
        RecallTask(num_keys=4, num_pairs=5, num_queries=1)
    with pytest.raises(ValueError, match="num_queries"):
        RecallTask(num_pairs=4, num_queries=5)
    with pytest.raises(ValueError, match="num_values"):
        RecallTask(num_values=0)


def test_tiny_study_runs(tmp_path):
    out = tmp_path / "recall.json"
    study = run_recall_study(TINY_RECALL, ["exact", "softmax:8"], num_pairs=[2, 4], out_path=out)
    assert [(r["num_pairs"], r["attention"]) for r in study["results"]] == [
        (2, "exact"),
        (2, "softmax m=8"),
        (4, "exact"),
        (4, "softmax m=8"),
    ]
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in study["results"])
    assert out.exists()


def test_elimination_baseline_matches_the_guess_it_describes():
    assert elimination_baseline(RecallTask(8, 8, 1, 1)) == 1.0
    assert elimination_baseline(RecallTask(8, 8, 2, 2)) == pytest.approx(0.75)
    assert elimination_baseline(RecallTask(8, 8, 4, 1)) == pytest.approx(0.25)
    # Guess uniformly among the values of the pairs not asked yet, on generated sequences (many
    # values, so that repeated values hardly help).
    task = RecallTask(num_keys=64, num_values=4096, num_pairs=8, num_queries=5)
    inputs, _ = generate_batch(task, 2000, torch.Generator().manual_seed(0))
    p, q = task.num_pairs, task.num_queries
    hits = 0.0
    for seq in inputs.tolist():
        table = dict(zip(seq[0 : 2 * p : 2], seq[1 : 2 * p : 2]))
        asked = seq[2 * p :: 2]
        for i, key in enumerate(asked):
            left = [v for k, v in table.items() if k not in asked[:i]]
            hits += left.count(table[key]) / len(left)
    assert hits / (len(inputs) * q) == pytest.approx(elimination_baseline(task), abs=0.01)


@pytest.mark.slow
def test_exact_attention_learns_a_small_recall_task():
    """Two pairs, both keys asked: guessing the value not answered yet scores 0.75, so accuracy near
    1 needs the lookup."""
    task = RecallTask(num_keys=8, num_values=8, num_pairs=2, num_queries=2)
    config = RecallConfig(
        task=task, d_model=64, n_layers=2, n_heads=2, batch_size=256, steps=600, lr=3e-4, warmup=20, eval_batches=4
    )
    result = run_recall_study(config, ["exact"])["results"][0]
    assert result["accuracy"] > 0.95 > elimination_baseline(task) + 0.15
