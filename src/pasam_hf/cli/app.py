"""`pasam app`: the interactive click-to-segment page in the browser (Gradio, the `app` extra).

Without `--model` it serves what `pasam demo` wrote (./pasam-demo/model) when it exists, else a small model with
random weights, and says so on the page. It runs offline: no analytics, no share link unless `--share`.
"""

from __future__ import annotations

import argparse
import importlib.util

from . import CLIError


def run_app(args: argparse.Namespace) -> int:
    from .segment import resolve_device

    if args.port is not None and not 0 < args.port < 65536:
        raise CLIError(f"--port {args.port} is not a TCP port; use 1-65535 (or leave it out: 7860 or the next free).")
    if args.cache_size < 1:
        raise CLIError(f"--cache-size is {args.cache_size}; keep at least 1 image.")
    if importlib.util.find_spec("gradio") is None:
        raise CLIError('pasam app needs Gradio: pip install "pasam-hf[app]" (or pip install gradio).')
    from ..app.models import load_app_model

    device = resolve_device(args.device)
    # The model first: a wrong --model is reported before the page is built.
    app_model = load_app_model(args.model, device=device, dtype=args.dtype)
    from ..app import ui

    print(f"pasam app: serving {app_model.source} on {device}"
          + (" (random weights: see the note on the page)" if app_model.source == "random" else ""), flush=True)
    ui.serve(app_model, host=args.host, port=args.port, share=args.share, cache_size=args.cache_size)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..loading import DTYPES

    parser = subparsers.add_parser(
        "app",
        help="the interactive click-to-segment page in your browser (needs the app extra)",
        description="Serve a page where you upload a photo and click on objects to segment them (points, boxes, "
                    "SAM's three masks, PA-SAM's explain view, segment everything, mask downloads). The image is "
                    "encoded once; each click runs only the mask decoder. Without --model it serves the model "
                    "`pasam demo` wrote (./pasam-demo/model), else a small random one. Offline.",
        epilog="example: pasam demo && pasam app   (then open http://127.0.0.1:7860)",
    )
    parser.add_argument("--model", metavar="ID_OR_DIR",
                        help="PA-SAM checkpoint directory or Hub id (a SAM checkpoint works too; default: "
                             "./pasam-demo/model if it exists, else a small random model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=None, help="port (default: 7860, or the next free one)")
    parser.add_argument("--device", default="auto", help="torch device, e.g. cpu, cuda (default: cuda if available)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="model weights' dtype")
    parser.add_argument("--share", action="store_true",
                        help="also make a public gradio.live link (contacts Gradio's servers; off by default)")
    parser.add_argument("--cache-size", type=int, default=4,
                        help="images whose embeddings are kept for later clicks (default: 4)")
    parser.set_defaults(func=run_app)


__all__ = ["register", "run_app"]
