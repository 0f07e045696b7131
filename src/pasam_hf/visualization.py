"""Pictures of PA-SAM results, drawn with PIL and OpenCV (no matplotlib).

Three public functions, used by `pasam segment`, `pasam generate`, `pasam demo` and the docs:

- [`overlay_masks`]: masks filled translucently with their edges drawn, plus the box and point prompts;
- [`explain_panel`]: the adapter's internals side by side (coarse mask, refined mask, uncertainty map, final mask,
  mined points), like Figure 7 of the PA-SAM paper;
- [`color_overlay`]: every mask of automatic mask generation in its own colour.

Frames. Everything drawn here is in the **image frame**: pixel coordinates of the original image, `x` to the right,
`y` down. The model works in its **input frame**: the image resized so that its longest side is
`config.vision_config.image_size` (1024 for released checkpoints), then padded at the bottom and right. Bring model
outputs to the image frame first:

- masks and maps (`pred_masks`, `coarse_masks`, `refined_masks`, `uncertainty_maps`) with
  `processor.post_process_masks(maps, inputs["original_sizes"], inputs["reshaped_input_sizes"], binarize=False)`,
  which removes the padding and resizes to the image;
- mined points (`mined_point_coords`, input frame) with [`input_frame_to_image_points`], i.e.
  `x_image = x_input * width / reshaped_width`, `y_image = y_input * height / reshaped_height`.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import torch

# Colours (RGB) shared by every picture so that they read the same way everywhere.
MASK_COLOR = (30, 144, 255)
EDGE_COLOR = (255, 255, 0)
BOX_COLOR = (0, 255, 0)
POSITIVE_COLOR = (0, 220, 0)
NEGATIVE_COLOR = (255, 40, 40)
TITLE_BACKGROUND = (24, 24, 24)
TITLE_COLOR = (240, 240, 240)

DEFAULT_EXPLAIN_TITLES = ("image", "coarse mask C", "refined mask R", "uncertainty U", "final mask")

ArrayLike = np.ndarray | torch.Tensor | PIL.Image.Image


def _to_numpy(value: ArrayLike) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value)


def _rgb_array(image: ArrayLike) -> np.ndarray:
    """`(H, W, 3)` uint8 from a PIL image, an `(H, W, 3)`/`(H, W)` uint8 array or a `(3, H, W)` tensor."""
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor) and image.ndim == 3 and image.shape[0] in (1, 3):
        image = image.permute(1, 2, 0)
    array = _to_numpy(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"image has shape {array.shape}; pass an RGB image of shape (H, W, 3) or a PIL image.")
    if array.dtype != np.uint8:
        array = np.clip(array * 255 if array.max(initial=0) <= 1 else array, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array)


def _mask_stack(masks: ArrayLike | Sequence[ArrayLike], height: int, width: int) -> np.ndarray:
    """Masks as a boolean `(N, height, width)` array; accepts `(H, W)`, `(N, H, W)` or `(N, 1, H, W)` (values > 0
    or `True` are foreground) and resizes masks of another size with nearest-neighbour interpolation."""
    if isinstance(masks, (list, tuple)):
        stacked = [_to_numpy(mask) for mask in masks]
        array = np.stack(stacked) if stacked else np.zeros((0, height, width), dtype=bool)
    else:
        array = _to_numpy(masks)
    if array.ndim == 4 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"masks have shape {array.shape}; pass (H, W), (N, H, W) or (N, 1, H, W).")
    binary = array > 0
    if binary.shape[1:] != (height, width):
        binary = np.stack(
            [cv2.resize(m.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0 for m in binary]
        ) if len(binary) else np.zeros((0, height, width), dtype=bool)
    return binary


def _mask_edges(mask: np.ndarray, thickness: int) -> np.ndarray:
    """Boolean `(H, W)` outline of a boolean mask, `thickness` pixels wide, inside the mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    edges = np.zeros(mask.shape, dtype=np.uint8)
    cv2.drawContours(edges, contours, -1, 1, thickness)
    return edges.astype(bool)


def _marker_radius(height: int, width: int) -> int:
    return max(2, round(max(height, width) / 120))


def _draw_points(
    canvas: np.ndarray, points: ArrayLike | None, labels: ArrayLike | None, radius: int | None = None
) -> None:
    """Draw `(M, 2)` `(x, y)` points on `canvas` in place: positive (label 1, the default) as green discs, negative
    (label 0) as red discs with a white cross. Other labels (padding, -1, -10) are skipped."""
    if points is None:
        return
    coords = _to_numpy(points).reshape(-1, 2)
    flags = np.ones(len(coords), dtype=np.int64) if labels is None else _to_numpy(labels).reshape(-1).astype(np.int64)
    if len(flags) != len(coords):
        raise ValueError(f"got {len(coords)} points but {len(flags)} point labels; pass one label per point.")
    radius = radius or _marker_radius(*canvas.shape[:2])
    for (x, y), label in zip(coords, flags):
        if label not in (0, 1) or not np.isfinite([x, y]).all():
            continue
        center = (int(round(float(x))), int(round(float(y))))
        color = POSITIVE_COLOR if label == 1 else NEGATIVE_COLOR
        cv2.circle(canvas, center, radius + 1, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(canvas, center, radius, color, -1, cv2.LINE_AA)
        if label == 0:
            arm = max(1, radius // 2)
            cv2.line(canvas, (center[0] - arm, center[1]), (center[0] + arm, center[1]), (255, 255, 255), 1)


def input_frame_to_image_points(
    coords: ArrayLike,
    original_size: Sequence[int],
    reshaped_input_size: Sequence[int],
) -> np.ndarray:
    """Map `(x, y)` points from the model input frame to the image frame.

    The processor resizes an image of size `original_size` to `reshaped_input_size` (longest side = the model's
    input size) and pads it at the bottom and right, so the map is a per-axis scale.

    Args:
        coords: `(..., 2)` points in the input frame, e.g. `outputs.mined_point_coords[b, p]` of shape `(2k, 2)`.
        original_size: `(height, width)` of the image, i.e. `inputs["original_sizes"][b]`.
        reshaped_input_size: `(height, width)` of the resized image, i.e. `inputs["reshaped_input_sizes"][b]`.

    Returns:
        `np.ndarray` of the same shape, float64, in image pixels. Points mined in the padding fall outside
        `[0, width] x [0, height]`; [`explain_panel`] skips them.
    """
    points = _to_numpy(coords).astype(np.float64)
    height, width = (float(v) for v in _to_numpy(original_size).reshape(-1)[:2])
    reshaped_height, reshaped_width = (float(v) for v in _to_numpy(reshaped_input_size).reshape(-1)[:2])
    scale = np.array([width / reshaped_width, height / reshaped_height])
    return points * scale


def overlay_masks(
    image: ArrayLike,
    masks: ArrayLike | Sequence[ArrayLike],
    boxes: ArrayLike | None = None,
    points: ArrayLike | None = None,
    point_labels: ArrayLike | None = None,
    alpha: float = 0.4,
    color: tuple[int, int, int] = MASK_COLOR,
    edge_thickness: int | None = None,
) -> PIL.Image.Image:
    """The image with masks filled translucently, their edges drawn, and the prompts marked.

    Args:
        image: PIL image, `(H, W, 3)` uint8 array or `(3, H, W)` tensor.
        masks: `(H, W)`, `(N, H, W)` or `(N, 1, H, W)`, in the image frame (e.g. `post_process_masks` output);
            values > 0 are foreground. Masks of another size are resized (nearest) to the image.
        boxes: `(N, 4)` `[x0, y0, x1, y1]` boxes in image pixels, drawn as green rectangles.
        points: `(M, 2)` `(x, y)` points in image pixels.
        point_labels: `(M,)`, 1 positive (green), 0 negative (red); all positive when `None`.
        alpha: Opacity of the mask fill.
        color: RGB colour of the fill; edges are yellow.
        edge_thickness: Outline width in pixels; scales with the image when `None`.

    Returns:
        `PIL.Image.Image` in RGB mode, the size of `image`.
    """
    canvas = _rgb_array(image).copy()
    height, width = canvas.shape[:2]
    stack = _mask_stack(masks, height, width)
    thickness = edge_thickness or max(1, round(max(height, width) / 400))
    if len(stack):
        union = stack.any(axis=0)
        fill = canvas.astype(np.float32)
        fill[union] = (1 - alpha) * fill[union] + alpha * np.array(color, dtype=np.float32)
        canvas = fill.round().astype(np.uint8)
        for mask in stack:
            canvas[_mask_edges(mask, thickness)] = EDGE_COLOR
    if boxes is not None:
        for x0, y0, x1, y1 in _to_numpy(boxes).reshape(-1, 4):
            cv2.rectangle(canvas, (round(x0), round(y0)), (round(x1), round(y1)), BOX_COLOR, thickness + 1)
    _draw_points(canvas, points, point_labels)
    return PIL.Image.fromarray(canvas)


def _palette(count: int, seed: int) -> np.ndarray:
    """`(count, 3)` uint8 saturated colours: evenly spaced hues in a seeded order, so neighbours differ."""
    hues = (np.arange(count) * 180 / max(count, 1)).astype(np.uint8)
    hues = hues[np.random.default_rng(seed).permutation(count)]
    hsv = np.stack([hues, np.full(count, 200, np.uint8), np.full(count, 255, np.uint8)], axis=-1)[None]
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)[0]


def color_overlay(
    masks: ArrayLike | Sequence[ArrayLike],
    image: ArrayLike | None = None,
    alpha: float = 0.55,
    seed: int = 0,
) -> PIL.Image.Image:
    """Every mask in its own colour, as automatic mask generation is usually shown.

    Larger masks are painted first so that small ones (parts) stay visible on top of the objects they belong to.

    Args:
        masks: `(N, H, W)` masks (or a list of `(H, W)` ones), e.g. `pipeline("mask-generation")(...)["masks"]`;
            values > 0 are foreground.
        image: Optional PIL image or `(H, W, 3)` uint8 array of the same size to blend the colours onto; without
            it the colours are drawn on black.
        alpha: Opacity of the colours over `image`.
        seed: Seeds the colour order, so the same masks get the same colours.

    Returns:
        `PIL.Image.Image` in RGB mode, `W x H`.
    """
    if image is not None:
        base = _rgb_array(image)
        height, width = base.shape[:2]
    else:
        first = masks[0] if isinstance(masks, (list, tuple)) and masks else masks
        shape = _to_numpy(first).shape
        if isinstance(masks, (list, tuple)) and not masks:
            raise ValueError("color_overlay got no masks and no image; pass the image to know the picture's size.")
        height, width = shape[-2:]
        base = np.zeros((height, width, 3), dtype=np.uint8)
    stack = _mask_stack(masks, height, width)
    colours = _palette(len(stack), seed)
    painted = np.zeros((height, width, 3), dtype=np.uint8)
    covered = np.zeros((height, width), dtype=bool)
    for index in np.argsort([-mask.sum() for mask in stack], kind="stable"):
        painted[stack[index]] = colours[index]
        covered |= stack[index]
    result = base.astype(np.float32)
    opacity = alpha if image is not None else 1.0
    result[covered] = (1 - opacity) * result[covered] + opacity * painted[covered]
    result = result.round().astype(np.uint8)
    for index in range(len(stack)):
        result[_mask_edges(stack[index], 1)] = 255
    return PIL.Image.fromarray(result)


def _probability_tile(values: np.ndarray, logits: bool) -> np.ndarray:
    """Gray `(H, W, 3)` uint8 picture of a mask: white = foreground probability 1."""
    probabilities = 1 / (1 + np.exp(-np.clip(values, -60, 60))) if logits else np.clip(values, 0, 1)
    gray = (probabilities * 255).round().astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _heat_tile(values: np.ndarray) -> np.ndarray:
    """Uncertainty in [0, 1] as an `(H, W, 3)` uint8 heat map (dark = certain, bright yellow = uncertain)."""
    gray = (np.clip(values, 0, 1) * 255).round().astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(gray, cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)


def _map_2d(value: ArrayLike, name: str) -> np.ndarray:
    array = _to_numpy(value).astype(np.float32)
    array = array.reshape(array.shape[-2:]) if array.ndim > 2 and np.prod(array.shape[:-2]) == 1 else array
    if array.ndim != 2:
        raise ValueError(f"{name} has shape {array.shape}; pass one map of shape (H, W) (or (1, H, W)).")
    return array


def _title_bar(text: str, width: int, font: PIL.ImageFont.ImageFont) -> PIL.Image.Image:
    # The bar's height comes from fixed reference glyphs, not from `text`, so that every tile's bar is as tall.
    top, bottom = font.getbbox("Ag|")[1::2]
    left, right = font.getbbox(text)[0::2]
    bar = PIL.Image.new("RGB", (width, bottom - top + 8), TITLE_BACKGROUND)
    PIL.ImageDraw.Draw(bar).text(((width - (right - left)) // 2, 4 - top), text, fill=TITLE_COLOR, font=font)
    return bar


def explain_panel(
    image: ArrayLike,
    coarse: ArrayLike,
    refined: ArrayLike,
    uncertainty: ArrayLike,
    final_mask: ArrayLike,
    mined_points: ArrayLike | None = None,
    mined_labels: ArrayLike | None = None,
    titles: Sequence[str] = DEFAULT_EXPLAIN_TITLES,
    logits: bool = True,
    tile_height: int = 256,
    gap: int = 4,
) -> PIL.Image.Image:
    """PA-SAM's internals for one prompt, as titled tiles side by side (cf. Figure 7 of the paper).

    Tiles, left to right: the image with the mined points; the coarse mask `C` and the refined mask `R` (foreground
    probability, white = 1); the uncertainty map `U` (heat map: bright where the adapter uses `R`, dark where it
    keeps `C`) with the mined points; the final mask over the image.

    Args:
        image: PIL image, `(H, W, 3)` uint8 array or `(3, H, W)` tensor.
        coarse: `(h, w)` coarse mask of the same area as `image` (any resolution; each map is resized to the tile),
            e.g. `post_process_masks(outputs.coarse_masks, ..., binarize=False)[b][p, 0]`.
        refined: `(h, w)` refined mask, like `coarse`.
        uncertainty: `(h, w)` uncertainty map in [0, 1], like `coarse` (post-processed the same way).
        final_mask: `(H, W)` final mask, > 0 is foreground (binary post-processed `pred_masks`).
        mined_points: `(M, 2)` `(x, y)` in **image** pixels; convert `outputs.mined_point_coords` with
            [`input_frame_to_image_points`]. Points outside the image (mined in the padding) are skipped.
        mined_labels: `(M,)`, 1 positive (green), 0 negative (red); `outputs.mined_point_labels[b, p]`.
        titles: Five tile titles, in the order above.
        logits: Whether `coarse` and `refined` are logits (the model's outputs) rather than probabilities.
        tile_height: Height of each tile in pixels; widths follow the image's aspect ratio.
        gap: Pixels between tiles.

    Returns:
        `PIL.Image.Image` in RGB mode, `(5 * tile_width + 4 * gap) x (tile_height + title bar)`.
    """
    if len(titles) != 5:
        raise ValueError(f"explain_panel takes 5 titles (image, coarse, refined, uncertainty, final); got {len(titles)}.")
    picture = _rgb_array(image)
    height, width = picture.shape[:2]
    tile_width = max(1, round(tile_height * width / height))
    size = (tile_width, tile_height)

    points = labels = None
    if mined_points is not None:
        points = _to_numpy(mined_points).reshape(-1, 2).astype(np.float64)
        labels = np.ones(len(points), np.int64) if mined_labels is None else _to_numpy(mined_labels).reshape(-1)
        inside = (points[:, 0] >= 0) & (points[:, 0] <= width) & (points[:, 1] >= 0) & (points[:, 1] <= height)
        # Tile pixels: the maps and the image are all scaled to the same tile size.
        points = points[inside] * np.array([tile_width / width, tile_height / height])
        labels = labels[inside]

    def resized(tile: np.ndarray, interpolation: int = cv2.INTER_LINEAR) -> np.ndarray:
        return cv2.resize(tile, size, interpolation=interpolation)

    image_tile = resized(picture, cv2.INTER_AREA)
    final = _mask_stack(final_mask, height, width)[0]
    tiles = [
        image_tile.copy(),
        resized(_probability_tile(_map_2d(coarse, "coarse"), logits)),
        resized(_probability_tile(_map_2d(refined, "refined"), logits)),
        resized(_heat_tile(_map_2d(uncertainty, "uncertainty"))),
        np.asarray(overlay_masks(image_tile, resized(final.astype(np.uint8), cv2.INTER_NEAREST))),
    ]
    for index in (0, 3):
        _draw_points(tiles[index], points, labels, radius=max(2, tile_height // 64))

    font = PIL.ImageFont.load_default()
    columns = [
        np.vstack([np.asarray(_title_bar(title, tile_width, font)), tile]) for title, tile in zip(titles, tiles)
    ]
    spacer = np.full((columns[0].shape[0], gap, 3), 255, dtype=np.uint8)
    row = [columns[0]]
    for column in columns[1:]:
        row += [spacer, column]
    return PIL.Image.fromarray(np.hstack(row))


__all__ = [
    "color_overlay",
    "explain_panel",
    "input_frame_to_image_points",
    "overlay_masks",
]
