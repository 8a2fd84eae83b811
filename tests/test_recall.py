"""Tests of the multi-query associative recall task and its training loop."""

import pytest
import torch

from randattn.recall import IGNORE_INDEX, TINY_RECALL, RecallTask, generate_batch, run_recall_study


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


def test_exact_attention_learns_a_small_recall_task():
    """A one-layer-deep lookup with 2 pairs is learned well above chance (1/8) within 150 steps."""
    config = TINY_RECALL.__class__(
        task=RecallTask(num_keys=8, num_values=8, num_pairs=2, num_queries=2),
        d_model=32,
        n_layers=2,
        n_heads=2,
        batch_size=32,
        steps=150,
        lr=3e-3,
        warmup=10,
        eval_batches=4,
    )
    result = run_recall_study(config, ["exact"])["results"][0]
    assert result["accuracy"] > 0.5
