"""Benchmark harness on the CPU: numbering and captions, resumable results, OOM as failure, figures."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
import torch
from PIL import Image
from torch import nn

from randattn.benchmark import (
    QUICK_GRID,
    SPEC_GRID,
    Budget,
    Grid,
    Point,
    crossover,
    figure_number,
    figures,
    load_results,
    plot_figure,
    ratio,
    run_sweep,
    write_figures,
)
from randattn.benchmark.__main__ import main as cli_main
from randattn.benchmark.grid import EMBED_DIMS, KERNELS, METRICS, MHA, RAND

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "benchmarks" / "attention.rst"
FAST = Budget(warmup=1, min_repeats=1, max_repeats=2, target_ms=1.0)
# The page's panel layout (3x3) with two short lengths: cheap with a fake model.
LAYOUT_GRID = Grid(embed_dims=(128,), seq_lens=(16, 32), batch_size=1, dtype="float32",
                   label="test")


class FakeAttention(nn.Module):
    """A linear map with the nn.MultiheadAttention call signature; runs out of memory on demand."""

    def __init__(self, embed_dim: int, oom_from: int | None = None, stage: str = "forward"):
        super().__init__()
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.oom_from, self.stage = oom_from, stage

    def forward(self, query, key, value, need_weights=True):
        out = self.proj(query)
        if self.oom_from is not None and query.shape[1] >= self.oom_from:
            if self.stage == "forward":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
            out = _OomInBackward.apply(out)
        return out, None


class _OomInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")


def fake_factory(oom_from=None, stage="forward", oom_model=MHA, built=None):
    def factory(point, device):
        if built is not None:
            built.append(point.key)
        return FakeAttention(point.embed_dim, oom_from if point.model == oom_model else None,
                             stage)
    return factory


# ---- grid, numbering, captions -------------------------------------------------------------

def test_figure_numbers_follow_the_formula_and_cover_67_to_98():
    specs = figures()
    assert [s.number for s in specs] == list(range(67, 99))
    for e_idx, e in enumerate(EMBED_DIMS):
        for k_idx, k in enumerate(KERNELS):
            for q_idx, q in enumerate(METRICS):
                assert figure_number(e, k, q) == 67 + 8 * e_idx + 4 * k_idx + q_idx
    assert figures()[0].caption == "Forward time for attention embed=128 ReLU"
    assert figures()[-1].caption == "Backward memory for attention embed=1024 Softmax"
    assert [s.number for s in figures([512], ["softmax"])] == [87, 88, 89, 90]


def test_page_captions_and_images_match_the_numbering():
    lines = PAGE.read_text(encoding="utf-8").splitlines()
    images = [(i, int(m.group(1))) for i, line in enumerate(lines)
              if (m := re.fullmatch(r"\.\. image:: \.\./_static/(\d+)\.png", line))]
    assert [n for _, n in images] == list(range(67, 99))
    for (i, number), spec in zip(images, figures()):
        previous = next(line for line in reversed(lines[:i]) if line.strip())
        assert number == spec.number and previous == spec.caption


SPEC_FILE = ROOT.parent / "shared" / "spec" / "attention_benchmarks.rst"


@pytest.mark.skipif(not SPEC_FILE.exists(), reason="the spec file is not beside the checkout")
def test_page_holds_the_spec_verbatim_with_one_paragraph_under_the_title():
    spec = SPEC_FILE.read_text(encoding="utf-8").splitlines()
    page = PAGE.read_text(encoding="utf-8").splitlines()
    first_section = page.index(spec[3])  # first section heading of the spec
    assert page[:3] == spec[:3] and page[first_section:] == spec[3:]


def test_grid_sizes_and_validation():
    points = list(SPEC_GRID.points())
    assert len([p for p in points if p.model == RAND]) == 4 * 2 * 3 * 3 * 8
    assert len([p for p in points if p.model == MHA]) == 4 * 3 * 8
    assert len({p.key for p in points}) == len(points)
    assert SPEC_GRID.seq_lens[0] == 512 and SPEC_GRID.seq_lens[-1] == 65536
    with pytest.raises(ValueError, match="dtype"):
        Grid(dtype="float16")
    with pytest.raises(ValueError, match="kernels"):
        Grid(kernels=("gelu",))
    with pytest.raises(ValueError, match="divisible"):
        Grid(embed_dims=(100,))


# ---- sweep on the real modules ---------------------------------------------------------------

def test_quick_cli_sweep_measures_every_point_and_plots(tmp_path, capsys):
    out = tmp_path / "quick.json"
    assert cli_main(["sweep", "--quick", "--output", str(out), "--no-progress",
                     "--plot", str(tmp_path / "fig")]) == 0
    results = load_results(out)
    assert set(results.points) == {p.key for p in QUICK_GRID.points()}
    assert results.metadata["complete"] and results.metadata["device"] == "CPU"
    for record in results.points.values():
        assert record["failure"] is None
        assert record["fwd_ms"] > 0 and record["bwd_ms"] > 0
        assert record["fwd_mib"] is None and record["bwd_mib"] is None  # no GPU memory on the CPU
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == sorted(
        f"{n}.png" for n in range(67, 99))


# ---- resumability ----------------------------------------------------------------------------

def test_sweep_interrupted_by_an_exception_resumes_without_redoing(tmp_path):
    path = tmp_path / "r.json"
    total = len(list(LAYOUT_GRID.points()))
    built: list[str] = []

    def interrupting(point, device):
        if len(built) == 5:
            raise KeyboardInterrupt
        return fake_factory(built=built)(point, device)

    with pytest.raises(KeyboardInterrupt):
        run_sweep(path, LAYOUT_GRID, device="cpu", budget=FAST, factory=interrupting,
                  progress=False)
    first = json.loads(path.read_text())
    assert len(first["points"]) == 5 and not first["metadata"]["complete"]

    resumed: list[str] = []
    results = run_sweep(path, LAYOUT_GRID, device="cpu", budget=FAST,
                        factory=fake_factory(built=resumed), progress=False)
    assert len(resumed) == total - 5 and not set(resumed) & set(built)
    assert len(results.points) == total and results.metadata["complete"]
    for record in first["points"]:  # the first five are kept as they were measured
        key = Point(**{k: record[k] for k in Point.__dataclass_fields__}).key
        assert results.points[key] == record

    again: list[str] = []
    run_sweep(path, LAYOUT_GRID, device="cpu", budget=FAST, factory=fake_factory(built=again),
              progress=False)
    assert again == []  # a complete file from the same setup is reused as it is


def test_sweep_with_another_setup_starts_afresh(tmp_path):
    path = tmp_path / "r.json"
    run_sweep(path, LAYOUT_GRID, device="cpu", budget=FAST, factory=fake_factory(),
              progress=False)
    built: list[str] = []
    other = Budget(warmup=1, min_repeats=1, max_repeats=1, target_ms=1.0)
    results = run_sweep(path, LAYOUT_GRID, device="cpu", budget=other,
                        factory=fake_factory(built=built), progress=False)
    assert len(built) == len(list(LAYOUT_GRID.points())) == len(results.points)
    assert load_results(path).setup["budget"]["max_repeats"] == 1


def test_sweep_killed_mid_way_resumes_without_losing_or_redoing(tmp_path):
    path = tmp_path / "killed.json"
    cmd = [sys.executable, "-m", "randattn.benchmark", "sweep", "--quick", "--no-progress",
           "--output", str(path), "--num-heads", "4", "8", "--num-features", "16", "32",
           "--seq-lens", "16", "32", "64", "128", "256", "--target-ms", "20"]
    total = 2 * 5 * (1 + 2 * 2)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if path.exists() and len(json.loads(path.read_text())["points"]) >= 3:
                break
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    killed = json.loads(path.read_text())["points"]
    assert 3 <= len(killed) < total, "the sweep was not killed mid-way"
    assert not json.loads(path.read_text())["metadata"]["complete"]

    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    final = json.loads(path.read_text())
    assert len(final["points"]) == total and final["metadata"]["complete"]
    # Timings differ from run to run: identical records prove the killed run's points were kept.
    assert final["points"][:len(killed)] == killed


# ---- out of memory -----------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["forward", "backward"])
def test_out_of_memory_is_recorded_as_a_failure_and_drawn(tmp_path, stage):
    path = tmp_path / "oom.json"
    results = run_sweep(path, LAYOUT_GRID, device="cpu", budget=FAST,
                        factory=fake_factory(oom_from=32, stage=stage), progress=False)
    assert len(results.points) == len(list(LAYOUT_GRID.points()))
    for record in results.points.values():
        if record["model"] == MHA and record["seq_len"] == 32:
            assert record["failure"] == f"out of memory ({stage})"
            assert record["bwd_ms"] is None
            assert (record["fwd_ms"] is None) == (stage == "forward")
        else:
            assert record["failure"] is None and record["bwd_ms"] > 0

    fig = plot_figure(load_results(path), figures([128], ["relu"])[1])  # backward time
    crosses = [line for ax in fig.axes for line in ax.get_lines() if line.get_marker() == "X"]
    assert len(crosses) == 9 and all(list(c.get_xdata()) == [32] for c in crosses)
    plt.close(fig)


class _FailingAttention(FakeAttention):
    def forward(self, query, key, value, need_weights=True):
        if query.shape[1] >= 32:
            raise RuntimeError("out of resource: shared memory, Required: 262400, Hardware limit: 232448\nmore")
        return super().forward(query, key, value, need_weights)


def test_a_point_whose_model_raises_is_recorded_and_the_sweep_goes_on(tmp_path):
    def factory(point, device):
        cls = _FailingAttention if point.model == MHA else FakeAttention
        return cls(point.embed_dim)

    results = run_sweep(tmp_path / "err.json", LAYOUT_GRID, device="cpu", budget=FAST, factory=factory,
                        progress=False)
    assert len(results.points) == len(list(LAYOUT_GRID.points()))
    failed = [r for r in results.points.values() if r["failure"]]
    assert failed and all(r["model"] == MHA and r["seq_len"] == 32 for r in failed)
    assert failed[0]["failure"] == (
        "error (forward): RuntimeError: out of resource: shared memory, Required: 262400, Hardware limit: 232448"
    )
    assert all(r["bwd_ms"] > 0 for r in results.points.values() if not r["failure"])


# ---- figures -----------------------------------------------------------------------------------

def test_figures_are_white_pngs_titled_with_their_caption(tmp_path):
    results = run_sweep(tmp_path / "r.json", LAYOUT_GRID, device="cpu", budget=FAST,
                        factory=fake_factory(), progress=False)
    paths = write_figures(results, tmp_path / "static")
    assert [p.name for p in paths] == [f"{n}.png" for n in range(67, 99)]
    for path, spec in zip(paths, figures()):
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.text["Title"] == spec.caption
            assert image.width >= 900
            assert image.convert("RGB").getpixel((2, 2)) == (255, 255, 255)
    assert plt.get_fignums() == []  # closed unless asked to keep them open


def test_figure_panels_follow_the_grid(tmp_path):
    results = run_sweep(tmp_path / "r.json", LAYOUT_GRID, device="cpu", budget=FAST,
                        factory=fake_factory(), progress=False)
    fig = plot_figure(results, figures([128], ["softmax"])[0])
    axes = fig.axes
    assert len(axes) == 9
    assert [ax.get_title() for ax in axes[:3]] == [f"m = {m} features" for m in (64, 128, 256)]
    assert [axes[3 * r].get_ylabel().split("\n")[0] for r in range(3)] == [
        "4 heads", "8 heads", "16 heads"]
    assert "batch 1 · fp32 · non-causal · CPU" in fig._suptitle.get_text()
    plt.close(fig)


def test_ratio_and_crossover(tmp_path):
    results = run_sweep(tmp_path / "r.json", LAYOUT_GRID, device="cpu", budget=FAST,
                        factory=fake_factory(), progress=False)
    for record in results.points.values():  # MHA quadratic, Rand linear: crossover at 32
        n = record["seq_len"]
        record["fwd_ms"] = n * n / 16 if record["model"] == MHA else 2.0 * n
    lengths, ratios = ratio(results, 128, 4, "relu", 64, ("fwd_ms",))
    assert lengths == [16, 32] and ratios == pytest.approx([0.5, 1.0])
    assert crossover(lengths, ratios) is None
    assert crossover([16, 32, 64, 128], [0.5, 1.5, 0.9, 2.0]) == 128
    assert crossover([16, 32, 64], [0.5, 1.5, 3.0]) == 32


def test_interleaved_timing_runs_the_models_in_turns_and_separates_the_passes():
    """Each model runs every round; a forward that waits 3 ms (or a backward that does) shows up in
    that pass of that model only."""
    import time as _time

    from randattn.benchmark.timing import interleaved

    order = []

    class Slow(nn.Module):
        def __init__(self, name, fwd_wait=0.0, bwd_wait=0.0):
            super().__init__()
            self.name, self.fwd_wait, self.bwd_wait = name, fwd_wait, bwd_wait
            self.lin = nn.Linear(8, 8)

        def forward(self, q, k, v, need_weights=False):
            order.append(self.name)
            _time.sleep(self.fwd_wait)
            out = self.lin(q)
            if self.bwd_wait:
                wait = self.bwd_wait

                def hook(grad):
                    _time.sleep(wait)
                    return grad

                out.register_hook(hook)
            return out, None

    x = torch.randn(2, 5, 8, requires_grad=True)
    models = {
        "plain": Slow("plain"),
        "slow_fwd": Slow("slow_fwd", fwd_wait=0.003),
        "slow_bwd": Slow("slow_bwd", bwd_wait=0.003),
    }
    result = interleaved(models, x, dtype="float32", rounds=3, steps=2, skip_rounds=1)
    assert order == (["plain"] * 2 + ["slow_fwd"] * 2 + ["slow_bwd"] * 2) * 3
    assert result["slow_fwd"]["fwd_issue_us"] > result["plain"]["fwd_issue_us"] + 2500
    assert result["slow_bwd"]["bwd_issue_us"] > result["plain"]["bwd_issue_us"] + 2500
    assert result["slow_fwd"]["bwd_issue_us"] < 2500 and result["slow_bwd"]["fwd_issue_us"] < 2500
    assert result["slow_fwd"]["total_us"] > 3000 and result["slow_bwd"]["total_us"] > 3000
    with pytest.raises(ValueError, match="rounds > skip_rounds"):
        interleaved(models, x, rounds=2, skip_rounds=2)


def test_back_to_back_timing_counts_every_step_and_resets_the_gradients():
    """Every step runs forward and backward with fresh gradients (a gradient accumulated across steps
    would differ from one step's); the time per step covers a 2 ms wait in each forward."""
    import time as _time

    from randattn.benchmark.timing import back_to_back

    calls = []

    class Waits(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, q, k, v, need_weights=False):
            calls.append(q.grad)
            _time.sleep(0.002)
            out = self.lin(q)

            def check(grad):
                calls.append(self.lin.weight.grad)
                return grad

            out.register_hook(check)
            return out, None

    model = Waits()
    x = torch.randn(2, 5, 8, requires_grad=True)
    ms = back_to_back(model, x, dtype="float32", steps=3, rounds=2, warmup=1)
    assert len(calls) == 2 * (1 + 3 * 2)
    assert all(c is None for c in calls)  # x and the weights have no gradient when a step starts
    assert ms >= 2.0
    assert x.grad is None and model.lin.weight.grad is None
    with pytest.raises(ValueError, match="steps >= 1"):
        back_to_back(model, x, steps=0)
