#!/usr/bin/env python
"""Fine-tune PA-SAM with `transformers.Trainer`: `model(..., labels=...)` returns the release's loss, so the stock
Trainer drives it with the package's dataset, collator and trainable set.

    python examples/trainer.py --model ./pa-sam-vit-b --data ./my_data --output-dir runs/trainer --max-steps 2000
    python examples/trainer.py --tiny                    # tiny random model on procedural images: seconds

`--data` is a folder with `images/` + `masks/` (or `im/` + `gt/`) or a `datasets` id/directory (see
`pasam_hf.data.load_records`); without it the run uses procedural thin-structure images (`pasam_hf.synthetic`).
`--model` is a PA-SAM or SAM checkpoint, directory or Hub id (SAM gets a fresh adapter, as with `pasam train`).

What `pasam train` adds over this script: exact resume of the prompt draws, the bad-sample policy, NaN-step
skipping, the embedding cache (see docs/training.md). The cells (`# %%`) run one by one in VS Code, PyCharm or
Jupyter (jupytext).
"""

# %% Imports and arguments
import argparse
import tempfile

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from pasam_hf import PASamConfig, PASamModel, PASamProcessor
from pasam_hf.data import PASamDataCollator, PASamTrainingDataset, PromptSimulator, load_records
from pasam_hf.loading import ModelLoadError, load_model_and_processor
from pasam_hf.synthetic import thin_structure_records
from pasam_hf.training import mark_trainable

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", help="PA-SAM or SAM checkpoint: directory or Hub id (SAM gets a fresh adapter)")
parser.add_argument("--tiny", action="store_true", help="tiny randomly initialised model, a few steps (no download)")
parser.add_argument("--data", help="training data (default: procedural thin-structure images)")
parser.add_argument("--output-dir", default=None, help="where the model is saved (default: a temporary directory)")
parser.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: 1000, or 3 with --tiny)")
parser.add_argument("--batch-size", type=int, default=4, help="images per device and step (release: 4)")
parser.add_argument("--learning-rate", type=float, default=1e-3, help="Adam learning rate (release: 1e-3)")
parser.add_argument("--point-mining-warmup-epochs", type=int, default=5,
                    help="epochs before hard point mining starts (release: 5)")
args = parser.parse_args()
if not args.tiny and args.model is None:
    parser.error("pass --model DIR_OR_HUB_ID (a PA-SAM or SAM checkpoint), or --tiny for a tiny random model")
output_dir = args.output_dir or tempfile.mkdtemp(prefix="pasam-trainer-")
max_steps = args.max_steps or (3 if args.tiny else 1000)

# %% Model, processor, and the release's trainable set
if args.tiny:
    torch.manual_seed(0)
    config = PASamConfig.small(image_size=128, edge_mode="rgb")
    model = PASamModel(config)
    processor = PASamProcessor.from_model_config(config)
else:
    # A PA-SAM checkpoint, or a SAM one wrapped with a fresh adapter (PASamModel.from_sam_pretrained), as `pasam
    # train` loads them; what cannot be loaded is said in one line.
    try:
        model, processor = load_model_and_processor(args.model)
    except ModelLoadError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
# Adapter, guiding branch, upscaling, the first hypernetwork MLP and the mask tokens; the rest is frozen.
trainable = mark_trainable(model)
print(f"training {sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters in "
      f"{len(trainable)} tensors")

# %% Data: records -> augmented, preprocessed items -> batches with simulated prompts
size = processor.image_processor.size["longest_edge"]
records = load_records(args.data) if args.data else thin_structure_records(8 if args.tiny else 512, size=size)
dataset = PASamTrainingDataset(records, processor, augment=True, seed=0)
pasam_collator = PASamDataCollator(PromptSimulator("pa-sam", seed=0), max_instances_per_image=4)
MODEL_INPUTS = ("pixel_values", "adapter_pixel_values", "input_boxes", "input_points", "input_labels",
                "input_masks", "labels")


def collate(items):
    # PASamDataCollator's batches also carry `names` and `skipped` (bookkeeping, not model inputs): the Trainer
    # passes every key to model(**batch), so keep only the model's.
    batch = pasam_collator(items)
    if "labels" not in batch:
        raise ValueError(f"every sample of a batch was unusable: {batch['skipped_details']}")
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


# %% Hard point mining after a warm-up, as released
class PointMiningWarmup(TrainerCallback):
    """Switch hard point mining on from epoch `warmup_epochs` (the release: off for epochs 0-4)."""

    def __init__(self, warmup_epochs: int):
        self.warmup_epochs = warmup_epochs

    def on_epoch_begin(self, training_args, state, control, model=None, **kwargs):
        model.set_point_mining(int(state.epoch or 0) >= self.warmup_epochs)


# %% Train
training_args = TrainingArguments(
    output_dir=output_dir,
    max_steps=max_steps,
    per_device_train_batch_size=args.batch_size,
    learning_rate=args.learning_rate,
    optim="adamw_torch",
    weight_decay=0.0,              # AdamW without weight decay is the release's Adam
    lr_scheduler_type="constant",  # the release decays x0.1 every 10 epochs of HQSeg-44K; see docs/training.md
    remove_unused_columns=False,   # the dataset's items are dicts of tensors, not columns to prune
    save_strategy="no",
    logging_steps=max(1, max_steps // 20),
    report_to="none",
    use_cpu=not torch.cuda.is_available(),
)
trainer = Trainer(
    model=model,
    args=training_args,
    train_dataset=dataset,
    data_collator=collate,
    callbacks=[PointMiningWarmup(args.point_mining_warmup_epochs)],
)
result = trainer.train()
print(f"{result.global_step} steps, training loss {result.training_loss:.4f}")

# %% Save: a full checkpoint that PASamModel.from_pretrained, pipeline() and `pasam segment` load
trainer.save_model(output_dir)
processor.save_pretrained(output_dir)
print(f"saved the fine-tuned model to {output_dir}")
