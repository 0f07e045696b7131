"""The interactive app's engine: a shared PA-SAM model, an image-feature cache and prompt -> mask, without Gradio.

SAM was designed for clicking: the image encoder runs once per image and each prompt then costs only the prompt
encoder and the mask decoder. PA-SAM adds a second image-only part, the guiding branch. [`SegmentationEngine`]
computes both once per image ([`ImageFeatures`], kept in a small LRU [`FeatureCache`] keyed by the image's pixels)
and runs every later prompt as `model(image_embeddings=..., adapter_embeddings=..., input_points=...)`, which gives
the masks of the uncached call (`tests/test_adapter_embeddings.py`).

Everything here is in the **image frame** (pixels of the image as the page shows it); the engine maps prompts into
the model's input frame the way [`PASamProcessor`] does, and masks back with `post_process_masks`, as
`pasam segment` does.
"""

from __future__ import annotations

import hashlib
import math
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from collections.abc import Callable

import numpy as np
import PIL.Image
import torch

from ..modeling_pasam import PASamModel
from ..processing_pasam import PASamProcessor
from ..validation import PromptClippedWarning, validate_prompts


class AppInputError(ValueError):
    """Input the page cannot use (not an image, a click outside it, ...): the message says what to do instead."""


@dataclass(frozen=True)
class Prompt:
    """One object's prompt in image pixels: any number of points (label 1 foreground, 0 background) and at most
    one box `(x0, y0, x1, y1)`."""

    points: tuple[tuple[float, float], ...] = ()
    labels: tuple[int, ...] = ()
    box: tuple[float, float, float, float] | None = None

    def is_empty(self) -> bool:
        return not self.points and self.box is None

    def with_point(self, x: float, y: float, label: int) -> Prompt:
        return Prompt(self.points + ((float(x), float(y)),), self.labels + (int(label),), self.box)

    def with_box(self, box: tuple[float, float, float, float]) -> Prompt:
        return Prompt(self.points, self.labels, tuple(float(v) for v in box))


@dataclass
class ImageFeatures:
    """What depends on the image alone, computed once per image.

    Attributes:
        image_embeddings (`torch.Tensor` of shape `(1, C, h, w)`): `model.get_image_embeddings(...)`.
        adapter_embeddings (`torch.Tensor` of shape `(1, C, h, w)`): `model.get_adapter_embeddings(...)`.
        original_sizes, reshaped_input_sizes (`torch.Tensor` of shape `(1, 2)`): the processor's, for
            `post_process_masks`.
    """

    image_embeddings: torch.Tensor
    adapter_embeddings: torch.Tensor
    original_sizes: torch.Tensor
    reshaped_input_sizes: torch.Tensor


@dataclass
class Segmentation:
    """The masks of one prompt, in the image frame.

    Attributes:
        masks (`np.ndarray` of shape `(M, H, W)`, bool): one mask (PA-SAM's refined mask) or, with multimask, SAM's
            three candidates.
        scores (`np.ndarray` of shape `(M,)`): the predicted IoU of each mask.
        coarse, refined (`np.ndarray` of shape `(H, W)`, *optional*): the adapter's coarse and refined mask logits
            (with `explain`).
        uncertainty (`np.ndarray` of shape `(H, W)`, *optional*): its uncertainty map in [0, 1] (with `explain`).
        mined_points (`np.ndarray` of shape `(2k, 2)`, *optional*), mined_labels (`(2k,)`): the points the adapter
            mined, `(x, y)` in image pixels, 1 positive and 0 negative (with `explain`).
    """

    masks: np.ndarray
    scores: np.ndarray
    coarse: np.ndarray | None = None
    refined: np.ndarray | None = None
    uncertainty: np.ndarray | None = None
    mined_points: np.ndarray | None = None
    mined_labels: np.ndarray | None = None

    @property
    def best(self) -> int:
        """Index of the mask with the highest predicted IoU."""
        return int(np.argmax(self.scores))


def image_key(image: np.ndarray) -> str:
    """A key of an image's content: its shape and pixels (two uploads of the same picture share their features)."""
    digest = hashlib.blake2b(str(image.shape).encode(), digest_size=16)
    digest.update(np.ascontiguousarray(image).data)
    return digest.hexdigest()


class FeatureCache:
    """[`ImageFeatures`] of the last `capacity` images, least recently used first out; safe across threads (the
    page's sessions share it)."""

    def __init__(self, capacity: int = 4):
        if capacity < 1:
            raise ValueError(f"cache capacity is {capacity}; keep at least 1 image.")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[str, ImageFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> ImageFeatures | None:
        with self._lock:
            features = self._entries.get(key)
            if features is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return features

    def put(self, key: str, features: ImageFeatures) -> None:
        with self._lock:
            self._entries[key] = features
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class SegmentationEngine:
    """A PA-SAM model and processor shared by all sessions of the page, with the per-image feature cache.

    Args:
        model ([`PASamModel`]): in eval mode, on its device.
        processor ([`PASamProcessor`]): the model's processor.
        cache_size (`int`, defaults to 4): images whose features are kept.
    """

    def __init__(self, model: PASamModel, processor: PASamProcessor, cache_size: int = 4):
        self.model = model.eval()
        self.processor = processor
        self.cache = FeatureCache(cache_size)
        self._generator = None
        self._everything_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ features
    def features(self, image: np.ndarray, key: str | None = None) -> ImageFeatures:
        """The image's [`ImageFeatures`], from the cache or computed (image encoder and guiding branch, once).

        Args:
            image (`np.ndarray` of shape `(H, W, 3)`, uint8): the image as the page shows it.
            key (`str`, *optional*): [`image_key`] of `image`, when the caller has it already.
        """
        key = key or image_key(image)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        try:
            inputs = self.processor(images=image, return_tensors="pt")
        except ValueError as error:
            raise AppInputError(" ".join(str(error).split())) from error
        device, dtype = self.model.device, self.model.dtype
        with torch.inference_mode():
            features = ImageFeatures(
                image_embeddings=self.model.get_image_embeddings(inputs["pixel_values"].to(device, dtype)),
                adapter_embeddings=self.model.get_adapter_embeddings(inputs["adapter_pixel_values"].to(device, dtype)),
                original_sizes=inputs["original_sizes"],
                reshaped_input_sizes=inputs["reshaped_input_sizes"],
            )
        self.cache.put(key, features)
        return features

    # ------------------------------------------------------------------------------------------------- prompts
    def model_prompts(self, prompt: Prompt, features: ImageFeatures) -> dict[str, torch.Tensor]:
        """`prompt` checked against the image and mapped into the model's input frame, as [`PASamProcessor`] maps
        `input_points` / `input_labels` / `input_boxes` (same scaling, float64 before the model casts them)."""
        if prompt.is_empty():
            raise AppInputError("no prompt yet: click on the object (or draw a box) to segment it.")
        height, width = (int(v) for v in features.original_sizes[0])
        new_height, new_width = (int(v) for v in features.reshaped_input_sizes[0])
        try:
            with warnings.catch_warnings():
                # The page clips boxes itself; anything clipped here is a sub-pixel rounding.
                warnings.simplefilter("ignore", PromptClippedWarning)
                checked = validate_prompts(
                    [(height, width)],
                    input_points=[[list(map(list, prompt.points))]] if prompt.points else None,
                    input_labels=[[list(prompt.labels)]] if prompt.points else None,
                    input_boxes=[[list(prompt.box)]] if prompt.box is not None else None,
                )
        except ValueError as error:
            raise AppInputError(" ".join(str(error).split())) from error
        scale = np.array([new_width / width, new_height / height])
        device = self.model.device
        inputs: dict[str, torch.Tensor] = {}
        if checked.points is not None:
            inputs["input_points"] = torch.from_numpy(checked.points * scale).to(device)
            inputs["input_labels"] = torch.from_numpy(checked.labels).to(device)
        if checked.boxes is not None:
            inputs["input_boxes"] = torch.from_numpy(checked.boxes * np.tile(scale, 2)).to(device)
        return inputs

    def segment(
        self,
        image: np.ndarray,
        prompt: Prompt,
        multimask: bool = False,
        explain: bool = False,
        threshold: float = 0.0,
        key: str | None = None,
    ) -> Segmentation:
        """The masks of one prompt on `image`: the cached features, the prompt encoder and the mask decoder.

        Args:
            image (`np.ndarray` of shape `(H, W, 3)`, uint8): the image as the page shows it.
            prompt ([`Prompt`]): points and/or a box in image pixels.
            multimask (`bool`): SAM's three candidate masks instead of PA-SAM's single refined one.
            explain (`bool`): also bring the adapter's coarse/refined/uncertainty maps and mined points to the image.
            threshold (`float`): mask logit threshold (0 is probability 0.5).
            key (`str`, *optional*): [`image_key`] of `image`.
        """
        features = self.features(image, key)
        inputs = self.model_prompts(prompt, features)
        with torch.inference_mode():
            outputs = self.model(
                image_embeddings=features.image_embeddings,
                adapter_embeddings=features.adapter_embeddings,
                multimask_output=multimask,
                **inputs,
            )
        original, reshaped = features.original_sizes, features.reshaped_input_sizes

        def to_image(maps: torch.Tensor, binarize: bool) -> np.ndarray:
            # (1, P=1, M, h, w) in the input frame -> (M, H, W) in the image frame, as `pasam segment` does.
            frame = self.processor.post_process_masks(
                [maps[0].float().cpu()], original, reshaped, mask_threshold=threshold, binarize=binarize
            )[0]
            return frame[0].numpy()

        result = Segmentation(
            masks=to_image(outputs.pred_masks, True), scores=outputs.iou_scores[0, 0].float().cpu().numpy()
        )
        if explain:
            from ..visualization import input_frame_to_image_points

            result.coarse = to_image(outputs.coarse_masks, False)[0]
            result.refined = to_image(outputs.refined_masks, False)[0]
            result.uncertainty = to_image(outputs.uncertainty_maps, False)[0]
            if outputs.mined_point_coords is not None:
                result.mined_points = input_frame_to_image_points(
                    outputs.mined_point_coords[0, 0].cpu(), original[0], reshaped[0]
                )
                result.mined_labels = outputs.mined_point_labels[0, 0].cpu().numpy()
        return result

    # ---------------------------------------------------------------------------------------- segment everything
    def segment_everything(
        self,
        image: np.ndarray,
        points_per_side: int = 32,
        points_per_batch: int = 64,
        pred_iou_thresh: float = 0.88,
        stability_score_thresh: float = 0.95,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[list[np.ndarray], list[float]]:
        """Every object: `pipeline("mask-generation")` on `image`, as `pasam generate` runs it.

        Args:
            points_per_side (`int`): the point grid's side (`points_per_side ** 2` point prompts).
            points_per_batch (`int`): point prompts per decoder call.
            progress (`Callable[[int, int], None]`, *optional*): called with `(batches done, batches in all)` after
                each decoder call.

        Returns:
            `(masks, scores)`: boolean `(H, W)` masks, highest predicted IoU first, and those IoUs.
        """
        if points_per_side < 1 or points_per_batch < 1:
            raise AppInputError("points per side and points per batch must be at least 1.")
        total = math.ceil(points_per_side**2 / points_per_batch)
        # One run at a time: the progress hook counts this thread's decoder calls on the shared model.
        with self._everything_lock:
            if self._generator is None:
                from transformers import pipeline

                self._generator = pipeline(
                    "mask-generation",
                    model=self.model,
                    image_processor=self.processor.image_processor,
                    device=self.model.device,
                )
            owner, done = threading.get_ident(), [0]

            def count(*_) -> None:
                if threading.get_ident() == owner:
                    done[0] += 1
                    if progress is not None:
                        progress(min(done[0], total), total)

            handle = self.model.register_forward_hook(count)
            try:
                result = self._generator(
                    PIL.Image.fromarray(image),
                    points_per_batch=points_per_batch,
                    points_per_crop=points_per_side,
                    pred_iou_thresh=pred_iou_thresh,
                    stability_score_thresh=stability_score_thresh,
                )
            finally:
                handle.remove()
        masks = [np.asarray(mask, dtype=bool) for mask in result["masks"]]
        scores = [float(score) for score in result["scores"]]
        order = np.argsort(scores, kind="stable")[::-1]
        return [masks[i] for i in order], [scores[i] for i in order]


__all__ = [
    "AppInputError",
    "FeatureCache",
    "ImageFeatures",
    "Prompt",
    "Segmentation",
    "SegmentationEngine",
    "image_key",
]
