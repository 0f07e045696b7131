"""The Space folder (`space/`): it builds the page of `pasam app` from the same code, and its requirements cover
the package's."""

from __future__ import annotations

import configparser
import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "space"


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[ ;]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
            for line in requirements if line.strip() and not line.strip().startswith("#")}


def test_space_requirements_cover_the_package_and_the_app_extra() -> None:
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    needed = config["options"]["install_requires"].split("\n") + config["options.extras_require"]["app"].split("\n")
    listed = (SPACE / "requirements.txt").read_text().splitlines()
    assert _names(needed) <= _names(listed)
    # The Gradio range is the extra's.
    assert [line for line in listed if line.startswith("gradio")] == [
        line.strip() for line in needed if line.strip().startswith("gradio")
    ]


def test_space_readme_has_the_spaces_metadata() -> None:
    text = (SPACE / "README.md").read_text()
    header = text.split("---")[1]
    for key in ("sdk: gradio", "app_file: app.py", "sdk_version:"):
        assert key in header


@pytest.mark.skipif(
    importlib.util.find_spec("gradio") is None, reason='gradio is not installed (pip install "pasam-hf[app]")'
)
def test_space_app_builds_the_same_page(monkeypatch, tmp_path) -> None:
    import gradio as gr

    from pasam_hf.app import ui

    served = {}
    monkeypatch.setattr(ui, "serve", lambda app_model, **kwargs: served.update(model=app_model, **kwargs))
    monkeypatch.chdir(tmp_path)  # no ./pasam-demo here: the small random model
    spec = importlib.util.spec_from_file_location("space_app", SPACE / "app.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main()
    assert served["host"] == "0.0.0.0" and served["port"] == 7860
    assert served["model"].source == "random" and "random weights" in served["model"].notice
    from pasam_hf.app import SegmentationEngine

    page = ui.build_app(SegmentationEngine(served["model"].model, served["model"].processor), served["model"].notice)
    assert isinstance(page, gr.Blocks)
