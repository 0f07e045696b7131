"""The interactive click-to-segment page (`pasam app`).

- [`engine`][pasam_hf.app.engine]: the shared model, the per-image feature cache (image embedding and PA-SAM's
  guiding embedding, computed once per image) and prompt -> masks; no Gradio.
- [`session`][pasam_hf.app.session]: one visitor's image, prompts and undo history, and what each action shows; no
  Gradio.
- [`images`][pasam_hf.app.images], [`exports`][pasam_hf.app.exports], [`models`][pasam_hf.app.models]: uploads and
  example pictures, downloads, and which model is served.
- `ui`: the Gradio page (the `app` extra: `pip install "pasam-hf[app]"`).
"""

from .engine import AppInputError, FeatureCache, ImageFeatures, Prompt, Segmentation, SegmentationEngine, image_key
from .session import CLICK_MODES, Session, View

__all__ = [
    "CLICK_MODES",
    "AppInputError",
    "FeatureCache",
    "ImageFeatures",
    "Prompt",
    "Segmentation",
    "SegmentationEngine",
    "Session",
    "View",
    "image_key",
]
