"""Fine-tuning PA-SAM with Accelerate: the loop ([`train`]), its settings ([`TrainingArguments`]), atomic
checkpoints with exact resume, and the embedding cache."""

from .arguments import TrainingArguments, add_training_arguments, arguments_from_namespace
from .cache import EmbeddingCacheDataset, EmbeddingCacheError, build_embedding_cache
from .checkpointing import CheckpointError, CheckpointManager, TrainerState
from .loop import HubUploadError, TrainingDivergedError, TrainingResult, mark_trainable, train

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "EmbeddingCacheDataset",
    "EmbeddingCacheError",
    "HubUploadError",
    "TrainerState",
    "TrainingArguments",
    "TrainingDivergedError",
    "TrainingResult",
    "add_training_arguments",
    "arguments_from_namespace",
    "build_embedding_cache",
    "mark_trainable",
    "train",
]
