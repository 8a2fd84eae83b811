"""Tests of the training-parity study: corpus, model, training loop and the command-line script."""

import json
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from randattn import RandMultiHeadAttention
from randattn.charlm import AttentionSpec, CausalTransformer, load_stdlib_corpus
from randattn.charlm.corpus import VAL_EVERY, batch_starts, get_batch, stdlib_root, stdlib_source_files
from randattn.charlm.train import TINY_STUDY, build_model, merge_studies, parity_table, run_parity_study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus():
    return load_stdlib_corpus(max_train_chars=100_000, max_val_chars=20_000)


def test_corpus_is_deterministic_split_by_file_and_round_trips(corpus):
    again = load_stdlib_corpus(max_train_chars=100_000, max_val_chars=20_000)
    assert torch.equal(corpus.train, again.train) and torch.equal(corpus.val, again.val)
    assert corpus.digest == again.digest and corpus.chars == again.chars
    root = stdlib_root()
    files = stdlib_source_files()
    rel = [p.relative_to(root).as_posix() for p in files]
    assert rel == sorted(rel)
    assert not any(part in ("test", "tests", "site-packages") for r in rel for part in r.split("/")[:-1])
    # Split by file: the first file opens the validation text, the second the training text.
    first_val = files[0].read_bytes().decode("utf-8", errors="replace")[:200]
    first_train = files[1].read_bytes().decode("utf-8", errors="replace")[:200]
    assert torch.equal(corpus.val[: len(first_val)], corpus.encode(first_val))
    assert torch.equal(corpus.train[: len(first_train)], corpus.encode(first_train))
    assert corpus.num_files[1] == math.ceil(len(files) / VAL_EVERY)
    text = "def f(x):\n    return x + 1\n"
    assert corpus.decode(corpus.encode(text)) == text
    assert corpus.vocab_size == len(corpus.chars) + 1 and corpus.chars == "".join(sorted(corpus.chars))


def test_batches_are_seeded_windows(corpus):
    starts = batch_starts(corpus.train.numel(), 16, 4, 3, seed=5)
    assert torch.equal(starts, batch_starts(corpus.train.numel(), 16, 4, 3, seed=5))
    assert not torch.equal(starts, batch_starts(corpus.train.numel(), 16, 4, 3, seed=6))
    x, y = get_batch(corpus.train, starts[0], 16)
    assert x.shape == y.shape == (4, 16)
    s = int(starts[0, 1])
    assert torch.equal(x[1], corpus.train[s : s + 16]) and torch.equal(y[1], corpus.train[s + 1 : s + 17])


def test_models_share_initial_weights_across_attention_kinds(corpus):
    models = {
        kind: build_model(TINY_STUDY, AttentionSpec.parse(kind), corpus.vocab_size)
        for kind in ("exact", "softmax:8", "relu:8")
    }
    ref = models["exact"].state_dict()
    for kind, model in models.items():
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("projection")}
        assert state.keys() == ref.keys(), kind
        for name, tensor in state.items():
            assert torch.equal(tensor, ref[name]), (kind, name)
    layers = models["softmax:8"].attention_layers()
    assert all(isinstance(layer, RandMultiHeadAttention) and layer.causal for layer in layers)
    assert layers[0].num_random_features == 8
    assert not torch.equal(layers[0].projection, layers[1].projection)  # one seed per layer


@pytest.mark.parametrize("short_conv", [0, 3])
@pytest.mark.parametrize("kind", ["exact", "softmax:8"])
def test_model_is_causal(corpus, kind, short_conv):
    model = CausalTransformer(
        corpus.vocab_size,
        16,
        d_model=16,
        n_layers=2,
        n_heads=2,
        attention=AttentionSpec.parse(kind),
        short_conv=short_conv,
    ).eval()
    x = torch.randint(0, corpus.vocab_size, (2, 16))
    if short_conv:  # trained-like (nonzero) convolutions, which must change the output
        before = model(x).detach()
        with torch.no_grad():
            for block in model.blocks:
                block.conv.weight.normal_(0.0, 0.5)
        assert not torch.allclose(model(x), before)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % corpus.vocab_size
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_short_convolution_starts_as_the_plain_model(corpus):
    config = replace(TINY_STUDY, short_conv=4)
    for kind in ("exact", "softmax:8"):
        plain = build_model(TINY_STUDY, AttentionSpec.parse(kind), corpus.vocab_size).eval()
        conv = build_model(config, AttentionSpec.parse(kind), corpus.vocab_size).eval()
        conv_state = conv.state_dict()
        extra = {k for k in conv_state if ".conv." in k}
        assert extra and all(not conv_state[k].any() for k in extra)  # zero-initialised
        for name, tensor in plain.state_dict().items():  # everything else as in the plain model
            assert torch.equal(tensor, conv_state[name]), (kind, name)
        x = torch.randint(0, corpus.vocab_size, (2, TINY_STUDY.context))
        with torch.no_grad():
            torch.testing.assert_close(conv(x), plain(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="short_conv"):
        CausalTransformer(corpus.vocab_size, 16, d_model=16, n_heads=2, short_conv=-1)


def test_attention_spec_with_redraw_redraws_during_training_only():
    spec = AttentionSpec.parse("softmax:8@3")
    assert spec == AttentionSpec("softmax", 8, 3) and spec.label == "softmax m=8 redraw 3"
    with pytest.raises(ValueError, match="redraw_interval"):
        AttentionSpec("exact", None, 5)
    model = CausalTransformer(11, 8, d_model=16, n_layers=1, n_heads=2, attention=spec)
    layer = model.attention_layers()[0]
    x = torch.randint(0, 11, (1, 8))
    first = layer.projection.clone()
    model.eval()
    for _ in range(4):
        model(x)
    assert torch.equal(layer.projection, first)
    model.train()
    seen = []
    for _ in range(7):
        model(x)
        seen.append(layer.projection.clone())
    assert torch.equal(seen[2], first) and not torch.equal(seen[3], first)  # 4th training forward redraws
    assert torch.equal(seen[3], seen[5]) and not torch.equal(seen[6], seen[5])


def test_attention_spec_parsing_and_errors():
    assert AttentionSpec.parse("softmax:128") == AttentionSpec("softmax", 128)
    assert AttentionSpec.parse("exact").label == "exact"
    assert AttentionSpec.parse("relu").label == "relu m=default"
    with pytest.raises(ValueError, match="kind"):
        AttentionSpec("linear")
    with pytest.raises(ValueError, match="num_features"):
        AttentionSpec("exact", 8)


def test_same_settings_give_the_same_run(corpus):
    config = replace(TINY_STUDY, steps=6, eval_every=3, final_eval_batches=2)
    a = run_parity_study(config, ["exact", "softmax:8"], corpus=corpus)
    b = run_parity_study(config, ["exact", "softmax:8"], corpus=corpus)
    for ra, rb in zip(a["results"], b["results"]):
        assert ra["curve"] == rb["curve"] and ra["final_val_loss"] == rb["final_val_loss"]
    assert a["parity"][0]["ratio"] == 1.0 and a["results"][1]["num_features"] == 8


def test_studies_of_one_variant_each_merge_into_the_joint_study(corpus):
    config = replace(TINY_STUDY, steps=6, eval_every=3, final_eval_batches=2)
    joint = run_parity_study(config, ["exact", "softmax:8"], corpus=corpus)
    parts = [run_parity_study(config, [spec], corpus=corpus) for spec in ("exact", "softmax:8")]
    merged = merge_studies(parts)
    assert [r["final_val_loss"] for r in merged["results"]] == [r["final_val_loss"] for r in joint["results"]]
    assert merged["parity"] == joint["parity"]
    with pytest.raises(ValueError, match="settings"):
        merge_studies([parts[0], run_parity_study(replace(config, steps=5), ["exact"], corpus=corpus)])


def test_parity_table():
    rows = parity_table(
        [
            {"attention": "exact", "kind": "exact", "final_val_loss": 2.0},
            {"attention": "softmax m=64", "kind": "softmax", "final_val_loss": 2.08},
            {"attention": "relu m=64", "kind": "relu", "final_val_loss": 2.2},
            {"attention": "softmax m=8", "kind": "softmax", "final_val_loss": math.nan},
        ]
    )
    assert [r["within"] for r in rows] == [True, True, False, False]
    assert rows[1]["ratio"] == pytest.approx(1.04)
    with pytest.raises(ValueError, match="exact"):
        parity_table([{"attention": "relu", "kind": "relu", "final_val_loss": 1.0}])


def test_tiny_script_runs_end_to_end(tmp_path):
    out = tmp_path / "parity.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_parity.py"), "--tiny", "--device", "cpu", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**__import__("os").environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    study = json.loads(out.read_text())
    assert [r["attention"] for r in study["results"]] == ["exact", "softmax m=16", "relu m=16"]
    assert all(math.isfinite(r["final_val_loss"]) for r in study["results"])
    # The tiny models learn something: far below the loss of a uniform guess.
    assert all(r["final_val_loss"] < 0.9 * math.log(study["corpus"]["vocab_size"]) for r in study["results"])
    assert study["environment"]["device"].startswith("CPU")
    assert {r["num_features"] for r in study["layer_errors"]} == {16, 64}
    assert "within tolerance" in proc.stdout or "outside tolerance" in proc.stdout


def test_steps_for_budget_fits_the_budget(monkeypatch, corpus):
    from randattn.charlm import train

    seconds = {"exact": 0.01, "softmax": 0.03}
    monkeypatch.setattr(train, "measure_step_seconds", lambda config, spec, corpus: seconds[spec.kind])
    specs = [AttentionSpec("exact"), AttentionSpec("softmax", 8)]
    config = replace(TINY_STUDY, steps=10_000)
    # 0.04 s per step for both models: 60 s allow 1500 steps.
    assert train.steps_for_budget(config, specs, corpus, 60.0) == 1500
    assert train.steps_for_budget(config, specs, corpus, 1e6) == 10_000  # capped by config.steps
    assert train.steps_for_budget(config, specs, corpus, 0.1) == 100  # never below one block of steps


def test_attention_spec_with_a_local_window_builds_windowed_layers():
    spec = AttentionSpec.parse("softmax:16w4")
    assert spec == AttentionSpec("softmax", 16, None, 4) and spec.label == "softmax m=16 window 4"
    assert AttentionSpec.parse("softmax:16w4@3") == AttentionSpec("softmax", 16, 3, 4)
    for bad in (("relu", 16, None, 4), ("softmax", 16, None, 0), ("exact", None, None, 4)):
        with pytest.raises(ValueError, match="local_window"):
            AttentionSpec(*bad)
    model = CausalTransformer(11, 8, d_model=16, n_layers=1, n_heads=2, attention=spec)
    assert model.attention_layers()[0].local_window == 4
