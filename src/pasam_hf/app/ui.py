"""The Gradio page of `pasam app` (and of the Space in `space/`): it wires [`Session`] actions to components.

Needs the `app` extra (`pip install "pasam-hf[app]"`). The model is shared by every visitor (one
[`SegmentationEngine`]); each browser session gets its own [`Session`] through `gr.State`. Nothing is fetched from
the network: Gradio's analytics are off, no share link is made unless asked, and the theme uses local fonts.
"""

from __future__ import annotations

import logging
import os
import traceback
from typing import Any
from collections.abc import Callable

# Gradio reads this when it is imported: no usage analytics and no version check.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402
import torch  # noqa: E402

from .engine import SegmentationEngine  # noqa: E402
from .images import example_images  # noqa: E402
from .models import AppModel  # noqa: E402
from .session import BACKGROUND, BOX, CLICK_MODES, FOREGROUND, NO_IMAGE, Session, View  # noqa: E402

logger = logging.getLogger(__name__)

TITLE = "PA-SAM: click to segment"
INTRO = (
    "Upload a photo (or pick an example), then click on an object. A *foreground point* adds to the mask, a "
    "*background point* removes a region, a *box* takes two clicks on opposite corners. The image is encoded "
    "once; every later click only runs PA-SAM's mask decoder."
)
# Uploads larger than this are refused by Gradio before they reach the page's code.
MAX_FILE_SIZE = "200mb"


def _internal_error(error: Exception) -> str:
    logger.error("pasam app: unexpected error\n%s", traceback.format_exc())
    return (f"Something went wrong ({type(error).__name__}: {' '.join(str(error).split())[:300]}); the page still "
            "works: undo, clear or upload another image. The server log has the details.")


def _outputs(session: Session, view: View) -> tuple:
    """A [`View`] as the values of `(state, canvas, status, candidates, explain, mask download, JSON download)`."""
    return (
        session,
        view.image,
        view.message,
        gr.Gallery(value=view.candidates or None, visible=bool(view.candidates)),
        gr.Image(value=view.explain, visible=view.explain is not None),
        gr.DownloadButton(value=view.mask_file, visible=view.mask_file is not None),
        gr.DownloadButton(value=view.json_file, visible=view.json_file is not None),
    )


def _guarded(action: Callable[..., View]) -> Callable[..., tuple]:
    """Run a session action; an unexpected exception becomes the status message (the session stays usable)."""

    def run(session: Session, *args: Any) -> tuple:
        try:
            view = action(session, *args)
        except Exception as error:  # noqa: BLE001 - one visitor's bad luck must not end anyone's page
            view = View(image=session.image, message=_internal_error(error))
        return _outputs(session, view)

    return run


def build_app(engine: SegmentationEngine, notice: str | None = None, source: str = "") -> gr.Blocks:
    """The page as a `gr.Blocks`, serving `engine`'s model; `notice` (Markdown) is shown at the top, e.g. that
    the weights are random; `source` names the model in the footer."""
    examples = example_images()

    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        if notice:
            gr.Markdown(notice, elem_id="notice")
        # One Session per browser session; its download files go when Gradio drops the session.
        state = gr.State(Session(), delete_callback=Session.close)
        with gr.Row():
            with gr.Column(scale=3):
                canvas = gr.Image(label="Image: click to add prompts", type="numpy", interactive=False,
                                  elem_id="canvas", buttons=[], height=520)
                status = gr.Markdown(NO_IMAGE, elem_id="status")
            with gr.Column(scale=2):
                upload = gr.File(label="Upload a photo", file_types=["image"], type="filepath", elem_id="upload")
                with gr.Row():
                    example_buttons = {name: gr.Button(f"Example: {name}", size="sm") for name in examples}
                mode = gr.Radio(list(CLICK_MODES), value=FOREGROUND, label="A click adds a", elem_id="mode")
                with gr.Row():
                    undo = gr.Button("Undo", elem_id="undo")
                    clear = gr.Button("Clear", elem_id="clear")
                multimask = gr.Checkbox(label="Multimask: SAM's three masks with their predicted IoU",
                                        elem_id="multimask")
                explain = gr.Checkbox(label="Explain: coarse mask, refined mask, uncertainty map, mined points",
                                      elem_id="explain")
                with gr.Row():
                    mask_download = gr.DownloadButton("Mask (PNG)", visible=False, elem_id="mask-download")
                    json_download = gr.DownloadButton("All masks (COCO RLE JSON)", visible=False,
                                                      elem_id="json-download")
        candidates = gr.Gallery(label="Multimask: SAM's three masks", columns=3, visible=False,
                                elem_id="candidates", allow_preview=False)
        # The panel titles its own tiles (image and mined points, coarse C, refined R, uncertainty U, final mask).
        explain_view = gr.Image(label="Explain", show_label=False, interactive=False, visible=False,
                                elem_id="explain-view", buttons=[])
        with gr.Accordion("Segment everything", open=False):
            with gr.Row():
                points_per_side = gr.Slider(4, 64, value=32, step=1, label="points per side (grid)")
                points_per_batch = gr.Slider(1, 256, value=64, step=1, label="points per batch")
                pred_iou = gr.Slider(0, 1, value=0.88, step=0.01, label="predicted IoU threshold")
                stability = gr.Slider(0, 1, value=0.95, step=0.01, label="stability threshold")
            everything_button = gr.Button("Segment everything", variant="primary", elem_id="everything")
            everything_status = gr.Markdown()
            everything_view = gr.Image(label="Every mask", interactive=False, elem_id="everything-view")
            everything_download = gr.DownloadButton("Masks (COCO RLE JSON)", visible=False)
        gr.Markdown(f"Model: `{source}`. The page runs offline; masks are computed on this machine.")

        outputs = [state, canvas, status, candidates, explain_view, mask_download, json_download]

        def load(session: Session, path: str | None) -> tuple:
            # The drop zone is emptied again, ready for the next file; the picture shows in the canvas.
            return (*_guarded(lambda s: s.load(engine, path))(session), None)

        upload.upload(load, [state, upload], [*outputs, upload])
        for name, button in example_buttons.items():
            button.click(
                _guarded(lambda session, picture=examples[name], name=name: session.load(engine, picture, name)),
                [state], outputs,
            )

        def click(session: Session, mode_value: str, multi: bool, expl: bool, event: gr.SelectData) -> tuple:
            # Gradio gives pixel coordinates of the picture, or no index for a click beside it (letterbox).
            index = event.index if isinstance(event.index, (list, tuple)) and len(event.index) >= 2 else None
            x, y = (float(v) for v in index[:2]) if index else (float("nan"), float("nan"))
            return _guarded(lambda s: s.click(engine, x, y, mode_value, multi, expl))(session)

        canvas.select(click, [state, mode, multimask, explain], outputs)
        undo.click(_guarded(lambda session, multi, expl: session.undo(engine, multi, expl)),
                   [state, multimask, explain], outputs)
        clear.click(_guarded(lambda session: session.clear()), [state], outputs)
        for switch in (multimask, explain):
            switch.change(_guarded(lambda session, multi, expl: session.refresh(engine, multi, expl)),
                          [state, multimask, explain], outputs)

        def everything(session: Session, side: float, batch: float, iou: float, stable: float,
                       progress: gr.Progress = gr.Progress()) -> tuple:
            def report(done: int, total: int) -> None:
                progress((done, total), desc="decoder batches")

            try:
                picture, message, path = session.everything(engine, int(side), int(batch), iou, stable, report)
            except Exception as error:  # noqa: BLE001
                picture, message, path = None, _internal_error(error), None
            return picture, message, gr.DownloadButton(value=path, visible=path is not None)

        # Its own queue: a long run does not hold up the clicks of other visitors.
        everything_button.click(
            everything, [state, points_per_side, points_per_batch, pred_iou, stability],
            [everything_view, everything_status, everything_download], concurrency_id="everything",
        )
    return page


def serve(app_model: AppModel, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
          cache_size: int = 4) -> None:
    """Build the page for `app_model` and serve it until interrupted (what `pasam app` and the Space run)."""
    # Subnormal floats make a CPU's matrix products many times slower (an image-encoder call of a random ViT-B on a
    # real photo: 390 s against 14 s); flushed to zero they change nothing a mask can show.
    torch.set_flush_denormal(True)
    engine = SegmentationEngine(app_model.model, app_model.processor, cache_size=cache_size)
    page = build_app(engine, notice=app_model.notice, source=app_model.source)
    page.queue(default_concurrency_limit=1).launch(
        server_name=host,
        server_port=port,
        share=share,
        inbrowser=False,
        show_error=True,
        ssr_mode=False,
        max_file_size=MAX_FILE_SIZE,
        theme=gr.themes.Default(),
    )


__all__ = ["BACKGROUND", "BOX", "FOREGROUND", "build_app", "serve"]
