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
        (["--port", "70000"], "--port 70000 is not a TCP port"),
        (["--cache-size", "0"], "--cache-size is 0"),
        (["--device", "cuda:7", "--model", "x"], "--device cuda:7"),
        (["--model", "./missing/model"], "model directory ./missing/model does not exist; check the path."),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(tmp_path, monkeypatch, capsys, args, message) -> None:
    import torch

    from pasam_hf.cli import main

    if "--device" in args and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    monkeypatch.chdir(tmp_path)
    assert main(["app", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert lines[0].startswith("pasam app: error: ") and message in lines[0], captured.err
    assert "Traceback" not in captured.err and "Running on" not in captured.out


def test_a_missing_model_directory_is_one_line_from_the_shell(tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    result = run_cli("app", "--model", "./empty", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[0] == (
        "pasam app: error: empty is a directory without config.json, so it is not a model checkpoint; point "
        "--model at a directory written by save_pretrained or `pasam convert`, or at a Hub id."
    )
    assert "Traceback" not in result.stderr


def test_app_is_listed_in_help() -> None:
    from pasam_hf.cli import build_parser

    assert "click-to-segment" in build_parser().format_help()
