"""`pasam convert`: release checkpoints (or a Hugging Face SAM directory) -> a PA-SAM checkpoint directory."""

from __future__ import annotations

import argparse

from . import CLIError

EPILOG = """examples:
  pasam convert sam_pa_epoch_20.pth --out pa-sam-vit-l               # merged PA-SAM release checkpoint
  pasam convert sam_vit_l_0b3195.pth epoch_20.pth --out pa-sam-vit-l  # SAM trunk + decoder-only checkpoint
  pasam convert sam_vit_b_01ec64.pth --out pa-sam-vit-b               # plain SAM: new, zero-initialised adapter
  pasam convert sam_pa_epoch_20.pth --out pa-sam-vit-l --push-to-hub me/pa-sam-vit-l --private
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert release checkpoints (.pth) or a HF SAM directory into a PA-SAM directory",
        description=(
            "Convert the original release's checkpoints into a PA-SAM directory (model.safetensors, config.json, "
            "preprocessor config, model card). SOURCE is a SAM checkpoint (sam_vit_*.pth), the merged PA-SAM "
            "checkpoint (sam_pa_epoch_N.pth), a Hugging Face SAM directory, or two files: a SAM checkpoint and the "
            "decoder-only PA-SAM checkpoint (epoch_N.pth). The ViT size is read from the tensors."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="one or two checkpoint files or directories")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (new or empty)")
    parser.add_argument("--config", metavar="PATH",
                        help="config.json or model directory describing the model (default: read from the tensors)")
    parser.add_argument("--decoder-heads", type=int, default=8, metavar="N",
                        help="mask decoder attention heads when the config is read from the tensors (SAM: 8)")
    parser.add_argument("--edge-mode", choices=("official", "rgb"),
                        help="adapter edge mode (default: the source's, 'official' for release weights)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="cast the weights (default: keep the checkpoint's)")
    parser.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    parser.add_argument("--push-to-hub", metavar="REPO", help="also upload the result to this Hub repo (owner/name)")
    parser.add_argument("--revision", metavar="BRANCH", help="Hub branch to upload to (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--token", help="Hugging Face token (default: the logged-in one)")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    from ..conversion import convert_checkpoint
    from ..loading import resolve_dtype

    if len(args.sources) > 2:
        raise CLIError(f"give one or two SOURCE files, got {len(args.sources)}.")
    if args.decoder_heads < 1:
        raise CLIError(f"--decoder-heads must be >= 1, got {args.decoder_heads}.")
    if (args.revision or args.private) and not args.push_to_hub:
        raise CLIError("--revision and --private apply to --push-to-hub REPO; add it or drop them.")
    report = convert_checkpoint(
        args.sources,
        args.out,
        config=args.config,
        adapter_config={"edge_mode": args.edge_mode} if args.edge_mode else None,
        decoder_attention_heads=args.decoder_heads,
        dtype=resolve_dtype(args.dtype) if args.dtype else None,
        overwrite=args.overwrite,
        push_to_hub_repo=args.push_to_hub,
        revision=args.revision,
        private=args.private,
        token=args.token,
    )
    print(report.summary())
    return 0
