"""`pasam demo --quick` end to end in a subprocess: outputs, picture sizes, the printed table, the warnings, and a
one-line error for an output directory that cannot be written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

from pasam_hf.cli import main
from pasam_hf.cli.demo import IMAGE_SIZE, UNTRAINED_WARNING

# One intra-op thread: the tiny model gains nothing from more, and the tests share the machine.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
ROW = re.compile(r"^(before|after|change)\s+([+-]?\d+\.\d+)\s+([+-]?\d+\.\d+)\s*$", re.MULTILINE)


def run_demo(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pasam_hf", "demo", *args],
        check=False, capture_output=True, text=True, timeout=timeout, env=ENV,
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("demo") / "out"
    return run_demo("--quick", "--out", str(out)), out


def test_quick_demo_exits_cleanly_and_writes_everything(quick_run) -> None:
    result, out = quick_run
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((out / "results.json").read_text())
    assert summary["settings"]["quick"] is True
    for name in ("config.json", "model.safetensors", "processor_config.json", "adapter/adapter_model.safetensors"):
        assert (out / "model" / name).is_file(), name
    # The checkpoint train() keeps for --resume is removed: the demo never resumes.
    assert not (out / "model" / "checkpoints").exists()

    overlays = sorted(out.glob("*_overlay.png"))
    panels = sorted(out.glob("*_explain.png"))
    assert len(overlays) == len(panels) == summary["settings"]["pictures"] >= 1
    for overlay, panel in zip(overlays, panels):
        assert overlay.name.replace("_overlay", "") == panel.name.replace("_explain", "")
        with PIL.Image.open(overlay) as image:
            # Ground truth, before, after: three image-sized tiles with 4 px gaps, under a title bar.
            assert image.mode == "RGB" and image.width == 3 * IMAGE_SIZE + 2 * 4
            assert IMAGE_SIZE < image.height <= IMAGE_SIZE + 40
        with PIL.Image.open(panel) as image:
            # explain_panel: five 256 px tiles (the images are square) with 4 px gaps, under a title bar.
            assert image.mode == "RGB" and image.width == 5 * 256 + 4 * 4
            assert 256 < image.height <= 256 + 40


def test_quick_demo_prints_a_table_that_matches_results_json(quick_run) -> None:
    result, out = quick_run
    rows = {name: (float(iou), float(biou)) for name, iou, biou in ROW.findall(result.stdout)}
    assert set(rows) == {"before", "after", "change"}, result.stdout
    summary = json.loads((out / "results.json").read_text())
    for stage in ("before", "after"):
        assert rows[stage][0] == pytest.approx(100 * summary[stage]["mean_iou"], abs=0.006)
        assert rows[stage][1] == pytest.approx(100 * summary[stage]["mean_boundary_iou"], abs=0.006)
        assert 0.0 <= rows[stage][0] <= 100.0 and 0.0 <= rows[stage][1] <= 100.0
    assert rows["change"][0] == pytest.approx(rows["after"][0] - rows["before"][0], abs=0.011)


def test_quick_demo_says_the_model_is_untrained_at_start_and_end(quick_run) -> None:
    result, _ = quick_run
    lines = result.stdout.splitlines()
    assert lines[0] == UNTRAINED_WARNING
    assert result.stdout.count(UNTRAINED_WARNING) == 2
    assert UNTRAINED_WARNING in lines[-3:]
    assert "RANDOMLY INITIALISED" in UNTRAINED_WARNING
    # ... and how to get real weights.
    assert "pasam convert sam_vit_b_01ec64.pth --out pa-sam-vit-b" in result.stdout
    assert "--model pa-sam-vit-b" in result.stdout


def test_unwritable_out_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # In-process (the CLI's own entry point): the error comes before any import of the model stack.
    assert main(["demo", "--quick", "--out", str(blocker / "demo")]) == 2
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("pasam demo: error:")]
    assert len(errors) == 1 and "--out" in errors[0] and "writable" in errors[0], captured.err
    assert "Traceback" not in captured.err
    # It fails before any work: nothing printed, trained or written.
    assert captured.out == "" and not (blocker.parent / "demo").exists()


def test_out_that_is_a_file_and_bad_steps_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    assert main(["demo", "--quick", "--out", str(blocker)]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["demo", "--steps", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--steps is 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
