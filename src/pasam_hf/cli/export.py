"""`pasam export-onnx`: the prompt encoder + mask decoder (with the prompt adapter) as one ONNX file."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..onnx_export import DEFAULT_OPSET, PROMPT_KINDS

    parser = subparsers.add_parser(
        "export-onnx",
        help="export the mask decoder with the prompt adapter to ONNX (image embeddings + prompts -> masks)",
        description=(
            "Writes the prompt side of PA-SAM (prompt encoder + mask decoder with the prompt adapter, eval mode) "
            "as one ONNX file: inputs image_embeddings, adapter_pixel_values and input_boxes (or input_points + "
            "input_labels); outputs pred_masks, iou_scores and uncertainty_maps. Needs the onnx extra: "
            'pip install "pasam-hf[onnx]".'
        ),
    )
    parser.add_argument("--model", required=True, help="PA-SAM (or SAM) checkpoint: directory or Hub id")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--prompt", choices=PROMPT_KINDS, default="boxes", help="prompt inputs of the graph")
    parser.add_argument(
        "--static-prompts", type=int, default=None, metavar="P",
        help="fix the number of prompts per image to P (default: any number)",
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--check", action="store_true",
        help="run the file with onnxruntime on random inputs and compare with PyTorch (needs onnxruntime)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..loading import load_model_and_processor
    from ..onnx_export import compare_with_onnxruntime, export_decoder_onnx
    from . import CLIError

    if args.static_prompts is not None and args.static_prompts < 1:
        raise CLIError(f"--static-prompts must be at least 1, got {args.static_prompts}.")
    model, _ = load_model_and_processor(args.model)
    path = export_decoder_onnx(
        model,
        args.out,
        prompt=args.prompt,
        num_prompts_dynamic=args.static_prompts is None,
        num_prompts=args.static_prompts or 1,
        opset=args.opset,
    )
    print(f"decoder exported to {path} ({args.prompt} prompts, opset {args.opset})")
    if args.check:
        differences = compare_with_onnxruntime(
            model, path, prompt=args.prompt, num_prompts=args.static_prompts or 3
        )
        worst = max(differences.values())
        summary = ", ".join(f"{name} {value:.2e}" for name, value in differences.items())
        if not worst <= 1e-3:
            raise CLIError(f"onnxruntime and PyTorch disagree on {path}: max |difference| {summary}.")
        print(f"onnxruntime matches PyTorch: max |difference| {summary}")
    return 0
