"""Which model the page serves: `--model`, else what `pasam demo` wrote, else a small random one (offline always).

The page says plainly when the weights are not trained SAM weights, and how to get real ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..modeling_pasam import PASamModel
from ..processing_pasam import PASamProcessor

# Where `pasam demo` writes its fine-tuned model by default (`--out ./pasam-demo`).
DEMO_MODEL_DIR = Path("pasam-demo") / "model"

REAL_WEIGHTS = (
    "For real masks, convert SAM's weights once, `pasam convert sam_vit_b_01ec64.pth --out pa-sam-vit-b` (or a "
    "PA-SAM release checkpoint), then run `pasam app --model pa-sam-vit-b` (`--model` also takes a Hub id)."
)
RANDOM_NOTICE = (
    "**This page runs a small PA-SAM with random weights**: no model was given and `pasam demo` has not been run "
    "here, so the masks are meaningless shapes; the page itself works. Run `pasam demo` and then `pasam app` for a "
    "small model fine-tuned on thin structures. " + REAL_WEIGHTS
)
DEMO_NOTICE = (
    "**This page runs the model `pasam demo` wrote** ({path}): a small PA-SAM started from random weights and "
    "fine-tuned for a few minutes on procedural thin structures, not trained SAM weights. It follows thin lines on "
    "plain backgrounds, not objects in photos. " + REAL_WEIGHTS
)


@dataclass
class AppModel:
    """The served model, its processor, where it came from and the page's notice about it (`None` for a model
    the user chose)."""

    model: PASamModel
    processor: PASamProcessor
    source: str
    notice: str | None = None


def random_model(seed: int = 0) -> tuple[PASamModel, PASamProcessor]:
    """The small random PA-SAM that `pasam demo` starts from (256 px input), in eval mode."""
    from ..cli.demo import _build_model

    model, processor = _build_model(seed)
    return model.eval(), processor


def load_app_model(
    model: str | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    demo_dir: str | Path = DEMO_MODEL_DIR,
) -> AppModel:
    """The model for the page.

    Args:
        model (`str`, *optional*): a checkpoint directory or Hub id (`pasam_hf.loading.load_model_and_processor`;
            a missing directory raises its `ModelLoadError`). Without it: `demo_dir` when it holds a model, else a
            small random model.
        device, dtype: where and in which dtype the model runs.
    """
    from ..loading import load_model_and_processor, resolve_dtype

    if model is not None:
        loaded, processor = load_model_and_processor(model, device=device, dtype=dtype)
        return AppModel(loaded, processor, source=str(model))
    demo_dir = Path(demo_dir)
    if (demo_dir / "config.json").is_file():
        loaded, processor = load_model_and_processor(str(demo_dir), device=device, dtype=dtype)
        return AppModel(loaded, processor, source=str(demo_dir), notice=DEMO_NOTICE.format(path=demo_dir))
    loaded, processor = random_model()
    loaded = loaded.to(device).to_inference_dtype(resolve_dtype(dtype))
    return AppModel(loaded, processor, source="random", notice=RANDOM_NOTICE)


__all__ = ["DEMO_MODEL_DIR", "AppModel", "load_app_model", "random_model"]
