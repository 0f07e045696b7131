"""Training data for PA-SAM: sources, mask decoding, augmentation, prompt simulation, batching.

From a user's data to a training batch:

    records = load_records("data/train")                      # folder or datasets source -> SegmentationRecords
    dataset = PASamTrainingDataset(records, processor)         # augmented, preprocessed items
    collator = PASamDataCollator(PromptSimulator("pa-sam", seed=0))
    loader = DataLoader(dataset, batch_size=4, collate_fn=collator)

See `docs/data.md`.
"""

from .augmentation import IMAGE_PAD_VALUE, MASK_PAD_VALUE, LargeScaleJitter, resize_longest_and_pad
from .collate import PASamDataCollator
from .dataset import (
    PASamIterableTrainingDataset,
    PASamTrainingDataset,
    SamplePreparer,
    bad_sample,
    input_size,
    is_bad_sample,
    sample_report,
)
from .masks import (
    MaskDecodeError,
    decode_mask,
    detect_mask_format,
    load_mask_array,
    resize_labels_bilinear,
    resize_mask_nearest,
)
from .prompts import PRESETS, PROMPT_KINDS, PromptSimulator
from .quality import BadSampleTracker, DataQualityError
from .records import BACKGROUND, FOREGROUND, IGNORE, SegmentationRecord
from .sources import (
    BadSampleError,
    DatasetRecords,
    FolderRecords,
    IterableRecords,
    RecordSequence,
    find_folder_pairs,
    load_record_sequence,
    load_records,
    load_records_from_flags,
)

__all__ = [
    "BACKGROUND",
    "FOREGROUND",
    "IGNORE",
    "IMAGE_PAD_VALUE",
    "MASK_PAD_VALUE",
    "PRESETS",
    "PROMPT_KINDS",
    "BadSampleError",
    "BadSampleTracker",
    "DataQualityError",
    "DatasetRecords",
    "FolderRecords",
    "IterableRecords",
    "LargeScaleJitter",
    "MaskDecodeError",
    "PASamDataCollator",
    "PASamIterableTrainingDataset",
    "PASamTrainingDataset",
    "PromptSimulator",
    "RecordSequence",
    "SamplePreparer",
    "SegmentationRecord",
    "bad_sample",
    "decode_mask",
    "detect_mask_format",
    "find_folder_pairs",
    "input_size",
    "is_bad_sample",
    "load_mask_array",
    "load_record_sequence",
    "load_records",
    "load_records_from_flags",
    "resize_labels_bilinear",
    "resize_longest_and_pad",
    "resize_mask_nearest",
    "sample_report",
]
