"""`pasam app` from the command line: bad arguments are one line and exit code 2, before any page is served (the
page itself: tests/test_app_browser.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, "-m", "pasam_hf", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "./missing/model"], "model directory ./missing/model does not exist; check the path."),
        (["--port", "70000"], "--port 70000 is not a TCP port"),
        (["--cache-size", "0"], "--cache-size is 0"),
        (["--device", "cuda:7", "--model", "x"], "--device cuda:7"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, args, message) -> None:
    if "--device" in args:
        import torch

        if torch.cuda.device_count() > 7:
            pytest.skip("this machine has a cuda:7")
    result = run_cli("app", *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("pasam app: error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert "Running on" not in result.stdout


def test_a_directory_without_a_model_is_named(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("app", "--model", "empty", cwd=tmp_path)
    assert result.returncode == 2
    assert "empty is a directory without config.json" in result.stderr


def test_app_is_listed_in_help(tmp_path) -> None:
    result = run_cli("--help", cwd=tmp_path)
    assert "app" in result.stdout and "click-to-segment" in result.stdout
