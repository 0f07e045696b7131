"""One visitor's page: the image, the prompts, and what each user action shows, as plain functions (no Gradio).

Each action ([`Session.load`], [`Session.click`], [`Session.undo`], [`Session.clear`], [`Session.refresh`],
[`Session.everything`]) updates the session and returns a [`View`]: the overlay, a message, SAM's candidate masks,
the explain panel and the files to download. The Gradio page (`pasam_hf.app.ui`) only wires them to its components,
and the tests call them as they are. A problem with the input (a file that is no image, a click outside the
picture, a box without area) never raises: it becomes the view's message and leaves the session as it was.

The model is shared by all sessions (in the [`SegmentationEngine`]); a session holds only its own image, prompts
and results.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable

import cv2
import numpy as np

from ..visualization import BOX_COLOR, color_overlay, explain_panel, overlay_masks
from .engine import AppInputError, Prompt, Segmentation, SegmentationEngine, image_key
from .exports import write_coco_json, write_mask_png
from .images import LoadedImage, read_array, read_upload

# What a click on the image adds.
FOREGROUND = "foreground point"
BACKGROUND = "background point"
BOX = "box (two corners)"
CLICK_MODES = (FOREGROUND, BACKGROUND, BOX)

NO_IMAGE = "Upload a photo or pick an example to start."
START = "Click on an object to segment it (a background point removes a region; a box takes two corner clicks)."


@dataclass
class View:
    """What the page shows after an action.

    Attributes:
        image: `(H, W, 3)` uint8, the image with the mask, box and points drawn (`None` before any image).
        message: one line for the status box.
        candidates: with multimask, SAM's three masks drawn on the image, each with a caption naming its predicted
            IoU; empty otherwise.
        explain: the explain panel (coarse mask, refined mask, uncertainty map, final mask, mined points), or `None`.
        mask_file: path of the shown mask as a PNG, or `None`.
        json_file: path of all masks of the result as COCO RLE JSON, or `None`.
    """

    image: np.ndarray | None
    message: str
    candidates: list[tuple[np.ndarray, str]] = field(default_factory=list)
    explain: np.ndarray | None = None
    mask_file: str | None = None
    json_file: str | None = None


@dataclass
class Session:
    """One visitor's state: the image (as the page shows it), its content key, the prompt and the undo history.

    Create one per browser session (Gradio's `gr.State` copies the empty one); `engine` is shared.
    """

    image: np.ndarray | None = None
    key: str | None = None
    name: str = "image"
    note: str | None = None
    prompt: Prompt = field(default_factory=Prompt)
    corner: tuple[float, float] | None = None
    history: list[tuple[Prompt, tuple[float, float] | None]] = field(default_factory=list)
    result: Segmentation | None = None
    workdir: str | None = None

    # -------------------------------------------------------------------------------------------------- actions
    def load(self, engine: SegmentationEngine, source: str | Path | np.ndarray | None, name: str = "image") -> View:
        """A new image: an uploaded file's path or an array (an example). Computes its features now, so that the
        first click costs only the decoder. The prompts start empty."""
        if source is None:
            return self._view(NO_IMAGE if self.image is None else START)
        try:
            loaded: LoadedImage = (
                read_array(source, name=name) if isinstance(source, np.ndarray) else read_upload(source)
            )
            key = image_key(loaded.image)
            engine.features(loaded.image, key)
        except AppInputError as error:
            kept = " The previous image stays." if self.image is not None else ""
            return self._view(f"{error}{kept}")
        self.image, self.key, self.name, self.note = loaded.image, key, loaded.name, loaded.note
        self._reset()
        return self._view(" ".join(filter(None, [loaded.note, START])))

    def click(
        self, engine: SegmentationEngine, x: float, y: float, mode: str = FOREGROUND, multimask: bool = False,
        explain: bool = False,
    ) -> View:
        """A click at `(x, y)` image pixels: adds a point of `mode`, or a box corner (a box after the second)."""
        if self.image is None:
            return self._view(NO_IMAGE)
        if mode not in CLICK_MODES:
            return self._view(f"Unknown click mode {mode!r}; choose one of: {', '.join(CLICK_MODES)}.")
        height, width = self.image.shape[:2]
        if not (np.isfinite([x, y]).all() and 0 <= x < width and 0 <= y < height):
            where = f"at ({x:g}, {y:g}) " if np.isfinite([x, y]).all() else ""
            return self._view(
                f"The click {where}is outside the {width}x{height} image; click on the picture itself."
            )
        previous = (self.prompt, self.corner)
        if mode == BOX and self.corner is None:
            self.history.append(previous)
            self.corner = (float(x), float(y))
            return self._view("First corner of the box set: click the opposite corner.")
        if mode == BOX:
            (x0, y0), (x1, y1) = self.corner, (float(x), float(y))
            if abs(x1 - x0) < 2 or abs(y1 - y0) < 2:
                return self._view("The two corners are (almost) on one line, so the box has no area: click the "
                                  "opposite corner of the object, away from the first one.")
            prompt = self.prompt.with_box((min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)))
        else:
            prompt = self.prompt.with_point(x, y, 1 if mode == FOREGROUND else 0)
        self.history.append(previous)
        self.prompt, self.corner = prompt, None
        view = self._segment(engine, multimask, explain)
        if self.result is None and not self.prompt.is_empty():
            # The model refused the prompt: take the action back, so that the session stays usable.
            self.prompt, self.corner = self.history.pop()
            view = self._view(view.message)
        return view

    def undo(self, engine: SegmentationEngine, multimask: bool = False, explain: bool = False) -> View:
        """Take back the last point, box or box corner."""
        if not self.history:
            return self._view("Nothing to undo." if self.image is not None else NO_IMAGE)
        self.prompt, self.corner = self.history.pop()
        return self._segment(engine, multimask, explain)

    def clear(self) -> View:
        """Remove every prompt (the image stays)."""
        if self.image is None:
            return self._view(NO_IMAGE)
        self._reset()
        return self._view(START)

    def refresh(self, engine: SegmentationEngine, multimask: bool = False, explain: bool = False) -> View:
        """The same prompt again, e.g. after the multimask or explain switch changed."""
        if self.image is None:
            return self._view(NO_IMAGE)
        return self._segment(engine, multimask, explain)

    def everything(
        self,
        engine: SegmentationEngine,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[np.ndarray | None, str, str | None]:
        """Segment everything (`pipeline("mask-generation")`): `(picture, message, COCO RLE JSON path)`."""
        if self.image is None:
            return None, NO_IMAGE, None
        try:
            masks, scores = engine.segment_everything(
                self.image, int(points_per_side), int(points_per_batch), float(pred_iou_thresh),
                float(stability_score_thresh), progress=progress,
            )
        except AppInputError as error:
            return None, str(error), None
        picture = np.asarray(color_overlay(masks, image=self.image)) if masks else self.image
        path = write_coco_json(masks, scores, self._file("everything.json"), self.name, self.image.shape[:2])
        hint = "" if masks else " Lower the predicted IoU and stability thresholds to keep more."
        count = f"{len(masks)} mask{'s' * (len(masks) != 1)}"
        return picture, f"{count} from a {int(points_per_side)} x {int(points_per_side)} point grid.{hint}", str(path)

    # ------------------------------------------------------------------------------------------------- helpers
    def close(self) -> None:
        """Delete the session's download files (when its browser tab is gone)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def _reset(self) -> None:
        self.prompt, self.corner, self.history, self.result = Prompt(), None, [], None

    def _segment(self, engine: SegmentationEngine, multimask: bool, explain: bool) -> View:
        if self.prompt.is_empty():
            self.result = None
            return self._view("Box corner set: click the opposite corner." if self.corner else START)
        try:
            self.result = engine.segment(self.image, self.prompt, multimask=multimask, explain=explain, key=self.key)
        except AppInputError as error:
            self.result = None
            return self._view(str(error))
        return self._view(self._describe(), explain=explain)

    def _describe(self) -> str:
        parts = []
        positive = sum(self.prompt.labels)
        negative = len(self.prompt.labels) - positive
        if positive:
            parts.append(f"{positive} foreground point{'s' * (positive != 1)}")
        if negative:
            parts.append(f"{negative} background point{'s' * (negative != 1)}")
        if self.prompt.box is not None:
            parts.append("a box")
        best = self.result.best
        area = int(self.result.masks[best].sum())
        which = f"best of {len(self.result.masks)} masks, " if len(self.result.masks) > 1 else ""
        corner = " Box corner set: click the opposite corner." if self.corner else ""
        return (f"{', '.join(parts)}: mask of {area:,} pixels ({which}predicted IoU "
                f"{self.result.scores[best]:.3f}).{corner}")

    def _file(self, suffix: str) -> Path:
        if self.workdir is None or not Path(self.workdir).is_dir():
            self.workdir = tempfile.mkdtemp(prefix="pasam-app-")
        return Path(self.workdir) / f"{self.name}_{suffix}"

    def _draw(self, masks: np.ndarray | None) -> np.ndarray:
        prompt = self.prompt
        picture = np.asarray(overlay_masks(
            self.image,
            masks if masks is not None else np.zeros((0, *self.image.shape[:2]), dtype=bool),
            boxes=[prompt.box] if prompt.box is not None else None,
            points=list(prompt.points) or None,
            point_labels=list(prompt.labels) or None,
        ))
        if self.corner is not None:
            picture = picture.copy()
            size = max(8, round(max(self.image.shape[:2]) / 50))
            center = tuple(round(v) for v in self.corner)
            cv2.drawMarker(picture, center, BOX_COLOR, cv2.MARKER_CROSS, size, max(1, size // 6))
        return picture

    def _view(self, message: str, explain: bool = False) -> View:
        if self.image is None:
            return View(image=None, message=message)
        result = self.result
        if result is None:
            return View(image=self._draw(None), message=message)
        best = result.best
        view = View(image=self._draw(result.masks[best : best + 1]), message=message)
        if len(result.masks) > 1:
            view.candidates = [
                (self._draw(mask[None]), f"mask {index + 1}: predicted IoU {score:.3f}")
                for index, (mask, score) in enumerate(zip(result.masks, result.scores))
            ]
        if explain and result.coarse is not None:
            view.explain = np.asarray(explain_panel(
                self.image, result.coarse, result.refined, result.uncertainty, result.masks[best],
                mined_points=result.mined_points, mined_labels=result.mined_labels,
            ))
        view.mask_file = str(write_mask_png(result.masks[best], self._file("mask.png")))
        view.json_file = str(write_coco_json(
            list(result.masks), result.scores.tolist(), self._file("masks.json"), self.name, self.image.shape[:2]
        ))
        return view


__all__ = ["BACKGROUND", "BOX", "CLICK_MODES", "FOREGROUND", "Session", "View"]
