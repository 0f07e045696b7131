#!/usr/bin/env python
"""Fine-tune PA-SAM on your own images and masks with Accelerate.

    # one process (CPU or one GPU)
    python examples/finetune.py --data ./my_data --model facebook/sam-vit-base --output-dir ./runs/pasam
    # several GPUs / nodes, DDP or FSDP2 as set up by `accelerate config` (DeepSpeed: not tested; docs/training.md)
    accelerate launch examples/finetune.py --data ./my_data --model facebook/sam-vit-base --output-dir ./runs/pasam
    # several CPU processes (DDP over gloo; `--cpu --num_processes 2` would start only one)
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 examples/finetune.py ...
    # continue a stopped run exactly where its last checkpoint left it
    accelerate launch examples/finetune.py ... --resume

`--data` is a folder with `images/` + `masks/` (or HQSeg-44K's `im/` + `gt/`) matched by file name, or a `datasets`
dataset id or directory with image and mask columns (`--image-column`, `--mask-column`). `--model` is a PA-SAM
checkpoint or a plain SAM one (it gets a fresh adapter that starts as SAM). All flags: `--help`.

The loop itself lives in `pasam_hf/training/loop.py` and is written to be read top to bottom: Accelerator set-up,
the release's trained parameter set, data and prompt simulation, Adam + StepLR, atomic checkpoints and exact resume,
then the training steps. `pasam train` runs the same code.
"""

import argparse

from pasam_hf.training import add_training_arguments, arguments_from_namespace, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser)
    args = arguments_from_namespace(parser.parse_args())
    result = train(args)
    print(f"{result.global_step} steps, final loss {result.losses[-1]:.4f}" if result.losses else "no step taken")


if __name__ == "__main__":
    main()
