"""
Associative recall
==================

Where is random-feature attention weak? In multi-query associative recall each sequence lists
key-value pairs and then asks for every key again, in random order; at each asked key the model
must predict its value (:mod:`randattn.recall`). Exact attention can look the key up directly. A
random-feature model summarises all pairs in a fixed ``m x d`` state per head, and a sharp lookup
is exactly the regime where the softmax estimate is noisiest (see
:doc:`plot_approximation_quality`).

Since every key is asked once, a model that has not learned the lookup can still guess among the
values not answered yet (:func:`randattn.recall.elimination_baseline`: the mean of ``1 / (P - i)``
over the ``P`` queries); that guess, not ``1 / num_values``, is the level a model must clearly beat.
Every model has the same architecture, steps, seeds and sequences. The results below were recorded
by ``scripts/train_parity.py --recall`` (``docs/_data/fidelity/recall.json``, written by
``scripts/gpu_fidelity.sh``); the page states the device, date and settings of the recording. If
that file is missing, a tiny CPU run of the study is shown instead.
"""

import json
from pathlib import Path

import matplotlib.pyplot as plt

from randattn.recall import TINY_RECALL, RecallTask, elimination_baseline, run_recall_study


def data_dir() -> Path:
    here = Path(globals().get("__file__", "plot_associative_recall.py")).resolve().parent
    for base in [here, *here.parents, Path.cwd(), *Path.cwd().parents]:
        if (base / "docs" / "_data" / "fidelity").is_dir():
            return base / "docs" / "_data" / "fidelity"
    raise FileNotFoundError("docs/_data/fidelity not found")


def recorded_study() -> dict | None:
    try:
        path = data_dir() / "recall.json"
    except FileNotFoundError:
        return None
    return json.loads(path.read_text()) if path.is_file() else None


study = recorded_study() or run_recall_study(TINY_RECALL, ["exact", "softmax:16"], num_pairs=[2, 4])
env, settings = study["environment"], study["settings"]
print(
    f"Recorded on {env['device']} on {env['date']} (random-feature attention backend {env.get('rand_attention_backend', 'reference')}, torch {env['torch']})."
)
print(
    f"Model: d_model {settings['d_model']}, {settings['n_layers']} layers, {settings['n_heads']} heads; "
    f"{settings['steps']} steps of batch {settings['batch_size']}, learning rate {settings['lr']}; "
    f"{settings['task']['num_keys']} keys, {settings['task']['num_values']} values."
)
if not env["device"].startswith("NVIDIA"):
    print("Note: these results come from a small run on a CPU, not from the full GPU study; see the settings above.")

# %%
# Accuracy against the number of key-value pairs
# ----------------------------------------------

results = study["results"]
labels = list(dict.fromkeys(r["attention"] for r in results))
pairs = sorted({r["num_pairs"] for r in results})


def baseline(p: int) -> float:
    """Accuracy of guessing among the values not answered yet, with all ``p`` keys asked."""
    task = settings["task"]
    return elimination_baseline(RecallTask(max(task["num_keys"], p), task["num_values"], p, p))


fig, ax = plt.subplots(figsize=(7, 4.6))
width = 0.8 / len(labels)
for i, label in enumerate(labels):
    acc = [
        next((r["accuracy"] for r in results if r["attention"] == label and r["num_pairs"] == p), float("nan"))
        for p in pairs
    ]
    ax.bar(
        [j + i * width for j in range(len(pairs))], acc, width, label=label, color="k" if label == "exact" else f"C{i}"
    )
ax.set_xticks([j + 0.4 - width / 2 for j in range(len(pairs))], [f"{p} pairs" for p in pairs])
for j, p in enumerate(pairs):
    ax.hlines(
        baseline(p),
        j - width / 2,
        j + 0.8 - width / 2,
        color="0.3",
        ls="--",
        label="guess among unanswered values" if j == 0 else None,
    )
ax.axhline(1 / settings["task"]["num_values"], color="0.5", ls=":", label="chance")
ax.set_ylabel("accuracy on the asked keys")
ax.set_ylim(0, 1.05)
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=3, frameon=False)
ax.set_title(f"multi-query associative recall ({env['device']})")
fig.tight_layout()
for r in results:
    print(
        f"{r['num_pairs']:3d} pairs  {r['attention']:>16}: accuracy {r['accuracy']:.3f} (guess {baseline(r['num_pairs']):.3f})"
    )
for p in pairs:
    exact = [r["accuracy"] for r in results if r["kind"] == "exact" and r["num_pairs"] == p]
    if exact and exact[0] < 0.9:
        print(
            f"With {p} pairs exact attention itself has not learned the task in this run (accuracy {exact[0]:.2f}, "
            f"guess {baseline(p):.2f}); the comparison at that size is inconclusive."
        )
