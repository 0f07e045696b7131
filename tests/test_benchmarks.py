"""Benchmarks in quick mode (tiny configs): every one runs and gives finite ratios; the training step is vectorised
over the batch (no Python loop over images)."""

from __future__ import annotations

import collections
import math
import runpy
import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from pasam_hf.benchmarking import (
    BENCHMARK_FUNCTIONS,
    BENCHMARKS,
    BenchmarkSettings,
    BenchmarkTable,
    _memory_probe,
    build_models,
    pasam_training_step,
    sam_config,
    training_batch,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
# The memory benchmark spawns four fresh interpreters (one per cell): half a minute even when tiny.
SLOW = {"memory"}


@pytest.mark.parametrize(
    "name", [pytest.param(name, marks=pytest.mark.heavy) if name in SLOW else name for name in BENCHMARKS]
)
def test_quick_benchmark_gives_finite_ratios(name):
    table = BENCHMARK_FUNCTIONS[name](BenchmarkSettings(quick=True, repeats=1))
    assert table.rows, table.notes
    ratios = table.all_ratios()
    assert ratios and all(ratio.is_finite() and ratio.median > 0 for ratio in ratios), [str(r) for r in ratios]
    markdown = table.to_markdown()
    assert markdown.startswith(f"### {table.title}") and all(column in markdown for column in table.ratio_columns)


def test_training_benchmark_script(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_training.py", "--quick", "--repeats", "1"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(REPO_ROOT / "benchmarks" / "bench_training.py"), run_name="__main__")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "| B=4 |" in out and "cached/encoder" in out and "pasam/sam cached" in out


def test_compile_option_compiles_every_compared_model(monkeypatch):
    """`--compile BACKEND` wraps each model of the decoder benchmark in torch.compile (the eager backend here: the
    plumbing, not inductor's code generation, which takes minutes on a CPU) and says so in the table notes."""
    from pasam_hf.benchmarking import add_benchmark_arguments, compiled, run_benchmarks, settings_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_benchmark_arguments(parser)
    assert settings_from_args(parser.parse_args(["--compile"])).compile == "inductor"
    assert settings_from_args(parser.parse_args([])).compile is None
    with pytest.raises(SystemExit) as exit_:  # argparse's usage error, naming the backends to choose from
        parser.parse_args(["--compile", "bogus"])
    assert exit_.value.code == 2
    settings = settings_from_args(parser.parse_args(["--quick", "--repeats", "1", "--compile", "eager"]))
    models = build_models(sam_config(True), kinds=("sam", "pasam"))
    wrapped = compiled(models, settings)
    assert all(isinstance(model, torch._dynamo.eval_frame.OptimizedModule) for model in wrapped.values())
    assert compiled(models, BenchmarkSettings(quick=True)) == models
    # Any benchmark outside COMPILED_BENCHMARKS gets the note; a stand-in keeps this test to the decoder's time.
    monkeypatch.setitem(BENCHMARK_FUNCTIONS, "processor", lambda settings: BenchmarkTable("stand-in", ["a"], []))
    decoder, processor = run_benchmarks(["decoder", "processor"], settings)
    assert decoder.rows and "torch.compile (backend eager)" in decoder.notes[-1]
    assert "ran eagerly" in processor.notes[-1]


def test_memory_probe_of_a_training_step_runs():
    # What each spawned process of the memory benchmark does, in this process (its peak is then only a floor).
    peak = _memory_probe(True, "cpu", torch.float32, "pasam", "train", 4)
    assert math.isfinite(peak) and peak >= 0


class TorchCalls(TorchFunctionMode):
    """Counts every torch function and tensor method called from Python (forward, loss, `backward()`, optimizer)."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.counts[getattr(func, "__name__", None) or repr(func)] += 1
        return func(*args, **(kwargs or {}))


def count_step(step, model, batch) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    """One training step's calls of each module of `model` (forward hooks), of each torch function called from
    Python, and of each operator the profiler sees (forward, backward and optimizer)."""
    modules: collections.Counter = collections.Counter()
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: modules.update([name]))
        for name, module in model.named_modules()
    ]
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile, TorchCalls() as calls:
            step(batch)
    finally:
        for handle in handles:
            handle.remove()
    operators = collections.Counter({event.key: event.count for event in profile.key_averages()})
    return modules, calls.counts, operators


def test_training_step_does_not_loop_over_the_batch():
    config = sam_config(quick=True)
    model = build_models(config, kinds=("pasam",))["pasam"]
    step = pasam_training_step(model)
    batches = {size: training_batch(config, size, seed=0, cached=True) for size in (1, 2, 4)}
    assert batches[4]["image_embeddings"].shape[0] == 4 and batches[4]["input_boxes"].shape[:2] == (4, 1)
    step(batches[1])  # warm-up: first-call work (lazy initialisation, optimizer state) is not per step
    counts = {size: count_step(step, model, batch) for size, batch in batches.items()}
    modules, calls, operators = counts[4]
    assert modules["mask_decoder.prompt_adapter"] == 1
    assert calls["topk"] >= 2 and calls["backward"] == 1  # Gumbel top-k mining and backward ran
    # The Python side issues the very same calls for one image as for four: nothing loops over the batch.
    assert modules == counts[1][0]
    assert calls == counts[1][1]
    # Operators, backward included: equal up to kernel choices that depend on shapes (batch 1 takes other conv
    # and matmul paths, so compare 2 with 4); a loop over the images would double the count.
    assert abs(sum(operators.values()) - sum(counts[2][2].values())) <= 0.01 * sum(operators.values())

    # The counts do see a loop over the images: one step per image makes four times the calls.
    with TorchCalls() as looped:
        for index in range(4):
            step({key: value[index : index + 1] for key, value in batches[4].items()})
    assert looped.counts["topk"] == 4 * calls["topk"]


@pytest.mark.parametrize("value", ["0", "-2", "two"])
def test_benchmark_threads_must_be_a_positive_count(value, capsys):
    from pasam_hf.benchmarking import script_main

    with pytest.raises(SystemExit) as exit_info:
        script_main("processor", ["--quick", "--threads", value])
    assert exit_info.value.code == 2
    assert "--threads: must be a whole number of threads, at least 1" in capsys.readouterr().err
