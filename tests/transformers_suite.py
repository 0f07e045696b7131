"""transformers' own common test mixins (`ModelTesterMixin`, `ConfigTester`, ...), for testing PA-SAM with them.

They ship in `tests/` of the transformers sdist, not in the wheel. [`load`] downloads the sdist of the *installed*
transformers version once (`pip download --no-deps --no-binary :all:`), unpacks its `tests/` into a cache outside
the repository (`~/.cache/pasam-hf/transformers-<version>-tests`; `PASAM_TRANSFORMERS_TESTS_CACHE` names another
folder) and imports it as the package `transformers_tests`: transformers' tests are a package named `tests` with
relative imports, which would clash with this repository's `tests/` folder.

The sdist holds the mixin files but not every module they import. What is missing is provided here, written for
this purpose (nothing is copied from the transformers repository):

- `exporters.test_export.ExportTesterMixin` and `generation.test_utils.GenerationTesterMixin`: empty bases. The
  export tests are therefore not run from the mixin; `torch.export` of PA-SAM is tested in
  test_transformers_common.py and test_onnx_export.py. SAM cannot `generate`, so no generation test applies.
- `utils.test_configuration_utils.config_common_kwargs`: arguments every `PreTrainedConfig` takes, for
  `ConfigTester.check_config_arguments_init`.
- `fetch_hub_objects_for_ci.url_to_local_path`: transformers' CI downloads a few fixture images before its tests;
  offline, each image URL maps to a synthetic RGB photo-like image written into the cache.
- `reports/tiny_model_summary.json` and `tests.pipelines.test_pipelines_mask_generation`: `PipelineTesterMixin`
  loads a tiny model per architecture from `TRANSFORMERS_TINY_MODEL_PATH` (a folder in the layout of transformers'
  `utils/create_dummy_models.py`; [`write_tiny_pipeline_model`] writes PA-SAM's) and runs the task's pipeline test
  class, given here by test_transformers_common.py.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
import zlib
from pathlib import Path

import numpy as np
import transformers

PACKAGE = "transformers_tests"
VERSION = transformers.__version__
CACHE_ROOT = Path(
    os.environ.get("PASAM_TRANSFORMERS_TESTS_CACHE") or Path.home() / ".cache" / "pasam-hf"
).expanduser()
CACHE = CACHE_ROOT / f"transformers-{VERSION}-tests"
# Where PipelineTesterMixin finds tiny models (read by transformers' test_pipeline_mixin when it is imported).
TINY_MODELS = Path(tempfile.gettempdir()) / f"pasam-hf-tiny-models-{os.getpid()}"

_loaded: types.SimpleNamespace | None = None
_error: str | None = None


def _download(target: Path) -> None:
    """Unpack `tests/` of the transformers sdist into `target` (atomically: a half-written cache is never used)."""
    CACHE_ROOT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_ROOT) as scratch:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             f"transformers=={VERSION}", "-d", scratch, "--quiet", "--disable-pip-version-check"],
            check=False, capture_output=True, text=True, timeout=600,
        )
        archives = list(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no archive"]
            raise RuntimeError(f"pip download failed ({last[0]})")
        unpacked = Path(scratch) / "unpacked"
        prefix = f"transformers-{VERSION}/tests/"
        with tarfile.open(archives[0]) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith(prefix) and m.isfile()]
            if not members:
                raise RuntimeError(f"the transformers {VERSION} sdist has no tests/ folder")
            for member in members:
                member.name = member.name[len(f"transformers-{VERSION}/"):]
            archive.extractall(unpacked, members=members, filter="data")
        # transformers' tests are a package; the sdist leaves out its empty __init__.py (and
        # test_configuration_common imports it).
        (unpacked / "tests" / "__init__.py").touch()
        try:
            unpacked.rename(target)
        except OSError:
            if not target.is_dir():  # another process finished first otherwise
                raise


def _module(name: str, path: list[str] | None = None, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = path
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def _fixture_image(url: str) -> str:
    """A local stand-in for a fixture image URL: a deterministic 480 x 640 RGB image with smooth regions, edges
    and texture (what the image processor tests compare across backends), written once into the cache."""
    path = CACHE / "fixtures" / (Path(url).stem + ".png")
    if not path.is_file():
        from PIL import Image

        rng = np.random.default_rng(zlib.crc32(Path(url).name.encode()))  # the same image in every process
        yy, xx = np.mgrid[:480, :640]
        image = np.stack([xx * 255 / 640, yy * 255 / 480, (xx + yy) * 255 / 1120], axis=-1)
        for _ in range(6):
            cy, cx, radius = rng.integers(40, 440), rng.integers(40, 600), rng.integers(20, 120)
            image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.integers(0, 256, 3)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.png")
        Image.fromarray(image).save(scratch)
        scratch.replace(path)
    return str(path)


def fixture_image(name: str) -> str:
    """Path of the synthetic fixture image standing in for `name` (see `_fixture_image`)."""
    return _fixture_image(name)


def _url_to_local_path(url: str) -> str:
    return _fixture_image(url) if url.lower().endswith((".png", ".jpg", ".jpeg")) else url


def _install_missing_modules() -> None:
    package = _module(PACKAGE, path=[str(CACHE / "tests")])
    package.__file__ = str(CACHE / "tests" / "__init__.py")
    _module(f"{PACKAGE}.exporters", path=[])
    _module(f"{PACKAGE}.exporters.test_export", ExportTesterMixin=type("ExportTesterMixin", (), {}))
    _module(f"{PACKAGE}.generation", path=[])
    _module(f"{PACKAGE}.generation.test_utils", GenerationTesterMixin=type("GenerationTesterMixin", (), {}))
    _module(f"{PACKAGE}.utils", path=[])
    _module(
        f"{PACKAGE}.utils.test_configuration_utils",
        config_common_kwargs={
            "return_dict": False,
            "output_hidden_states": True,
            "output_attentions": True,
            "dtype": "float16",
            "architectures": ["PASamModel"],
            "id2label": {0: "background", 1: "object"},
            "label2id": {"background": 0, "object": 1},
            "problem_type": "single_label_classification",
        },
    )
    _module("fetch_hub_objects_for_ci", url_to_local_path=_url_to_local_path)


def _import_mixins() -> types.SimpleNamespace:
    _install_missing_modules()
    TINY_MODELS.mkdir(parents=True, exist_ok=True)
    (TINY_MODELS / "reports").mkdir(exist_ok=True)
    summary = TINY_MODELS / "reports" / "tiny_model_summary.json"
    if not summary.is_file():
        summary.write_text(json.dumps({}))
    os.environ["TRANSFORMERS_TINY_MODEL_PATH"] = str(TINY_MODELS)
    # test_pipeline_mixin imports transformers once more from `<sdist>/src/transformers` (the layout of a source
    # checkout): point that at the installed package, and keep the module object every other import already holds.
    source = CACHE / "src" / "transformers"
    if not source.exists():
        source.parent.mkdir(parents=True, exist_ok=True)
        try:
            source.symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
        except FileExistsError:
            pass
    installed = sys.modules["transformers"]
    try:
        modules = {
            name: importlib.import_module(f"{PACKAGE}.{name}")
            for name in ("test_configuration_common", "test_modeling_common", "test_image_processing_common",
                         "test_processing_common", "test_pipeline_mixin")
        }
    finally:
        sys.modules["transformers"] = installed
    pipeline_mixin = modules["test_pipeline_mixin"]
    # It looks processor classes up by name in transformers; PA-SAM's are in pasam_hf.
    import pasam_hf

    class _Names(types.ModuleType):
        def __getattr__(self, name):
            return getattr(pasam_hf, name) if hasattr(pasam_hf, name) else getattr(installed, name)

    pipeline_mixin.transformers_module = _Names("transformers")
    atexit.register(shutil.rmtree, TINY_MODELS, ignore_errors=True)
    return types.SimpleNamespace(
        ConfigTester=modules["test_configuration_common"].ConfigTester,
        ModelTesterMixin=modules["test_modeling_common"].ModelTesterMixin,
        floats_tensor=modules["test_modeling_common"].floats_tensor,
        ids_tensor=modules["test_modeling_common"].ids_tensor,
        ImageProcessingTester=modules["test_image_processing_common"].ImageProcessingTester,
        ImageProcessingTestMixin=modules["test_image_processing_common"].ImageProcessingTestMixin,
        prepare_image_inputs=modules["test_image_processing_common"].prepare_image_inputs,
        ProcessorTesterMixin=modules["test_processing_common"].ProcessorTesterMixin,
        PipelineTesterMixin=modules["test_pipeline_mixin"].PipelineTesterMixin,
        pipeline_mixin_module=pipeline_mixin,
    )


def load() -> tuple[types.SimpleNamespace | None, str | None]:
    """`(mixins, None)`, or `(None, reason)` when the transformers test sources cannot be had (no network, pip
    failed, a module they import is missing). Downloads once per version; later calls use the cache."""
    global _loaded, _error
    if _loaded is None and _error is None:
        try:
            if not (CACHE / "tests" / "__init__.py").is_file():
                _download(CACHE)
            _loaded = _import_mixins()
        except Exception as error:  # noqa: BLE001 - any failure means the same here: the suite is unavailable
            _error = (
                f"transformers {VERSION}'s common test mixins are unavailable: they come from its sdist "
                f"(pip download transformers=={VERSION} --no-binary :all:) and that failed: "
                f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            )
    return _loaded, _error


def write_tiny_pipeline_model(model, image_processor) -> None:
    """Save `model` and `image_processor` where `PipelineTesterMixin` looks for the tiny model of the model's
    architecture (`<TRANSFORMERS_TINY_MODEL_PATH>/<model_type>/<architecture>`), and list it in the summary."""
    name = type(model).__name__
    target = TINY_MODELS / model.config.model_type / name
    if target.exists():
        shutil.rmtree(target)
    model.save_pretrained(target)
    image_processor.save_pretrained(target)
    # test_pipeline_mixin read the summary file when it was imported.
    _loaded.pipeline_mixin_module.tiny_model_summary[name] = {
        "tokenizer_classes": [], "processor_classes": [type(image_processor).__name__]
    }


def register_pipeline_test(task: str, test_class: type) -> None:
    """Make `PipelineTesterMixin` run `test_class` (`get_test_pipeline`, `run_pipeline_test`) for `task`: its
    mapping names transformers' `tests.pipelines...` classes, which the sdist leaves out."""
    name = f"{PACKAGE}.pipelines.{test_class.__name__}"
    _module(f"{PACKAGE}.pipelines", path=[])
    _module(name, **{test_class.__name__: test_class})
    _loaded.pipeline_mixin_module.pipeline_test_mapping[task]["test"] = f"{name}.{test_class.__name__}"
