"""Bad-sample accounting: a few broken files are skipped and reported, too many abort the run.

Feed every batch of an epoch to [`BadSampleTracker.update`] (including batches that hold only `skipped`). Once at
least `min_samples` samples were seen, a bad fraction above `max_fraction` raises [`DataQualityError`]: a dataset
that is mostly broken (wrong mask folder, wrong column, wrong `void_value`) should stop the run early rather than
train on what is left. At the end of an epoch the fraction is exact, so `exceeds(complete=True)` checks it whatever
the dataset size (the training loop does, with the counts of all processes). `summary()` gives the counts and names
for the epoch report.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# How many bad sample names an error message lists.
_NAMES_SHOWN = 5


class DataQualityError(RuntimeError):
    """Too many samples of the training data cannot be used."""


class BadSampleTracker:
    """Counts seen and bad samples over an epoch.

    Args:
        max_fraction (`float`, defaults to 0.1): highest bad fraction tolerated (CLI: `--max-bad-fraction`).
        min_samples (`int`, defaults to 20): samples to see before the fraction is checked, so that one bad file
            among the first few does not abort.
    """

    def __init__(self, max_fraction: float = 0.1, min_samples: int = 20):
        if not 0 <= max_fraction <= 1:
            raise ValueError(f"max_fraction={max_fraction} must be in [0, 1].")
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.reset()

    def reset(self) -> None:
        """Start a new epoch."""
        self.seen = 0
        self.details: list[dict[str, str]] = []

    @property
    def bad(self) -> int:
        """Number of bad samples seen."""
        return len(self.details)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.seen if self.seen else 0.0

    def add(self, batch: dict[str, Any]) -> None:
        """Count one collated batch (its `names` and `skipped`) without checking the fraction."""
        names = batch.get("names", [])
        skipped = batch.get("skipped", [])
        details = batch.get("skipped_details") or [{"name": name, "kind": "unknown", "reason": ""} for name in skipped]
        self.seen += len(names) + len(skipped)
        self.details.extend(details)

    def exceeds(self, seen: int | None = None, bad: int | None = None, complete: bool = False) -> bool:
        """Whether `bad` of `seen` samples (default: this tracker's counts; pass totals over processes) is too many.

        Before `min_samples` samples the answer is `False` unless `complete` (the whole epoch was seen, so the
        fraction is exact whatever the dataset size)."""
        seen = self.seen if seen is None else seen
        bad = self.bad if bad is None else bad
        if seen == 0 or (seen < self.min_samples and not complete):
            return False
        return bad / seen > self.max_fraction

    def update(self, batch: dict[str, Any]) -> None:
        """Count one collated batch; raise [`DataQualityError`] when the bad fraction is too high."""
        self.add(batch)
        if self.exceeds():
            raise DataQualityError(self.message())

    def message(self, seen: int | None = None, details: list[dict[str, str]] | None = None) -> str:
        """The error message for `details` (bad samples) among `seen` (defaults: this tracker's)."""
        seen = self.seen if seen is None else seen
        details = self.details if details is None else details
        bad = len(details)
        shown = "; ".join(f"{item['name']} ({item['reason']})" for item in details[:_NAMES_SHOWN])
        more = f" and {bad - _NAMES_SHOWN} more" if bad > _NAMES_SHOWN else ""
        kinds = ", ".join(f"{count} {kind}" for kind, count in Counter(item["kind"] for item in details).most_common())
        return (
            f"{bad} of {seen} training samples ({bad / max(seen, 1):.1%}) could not be used ({kinds}), more than the "
            f"allowed max_bad_fraction={self.max_fraction:g} ({self.max_fraction:.0%}). First: {shown}{more}. Fix or "
            "remove these files (check the mask folder, the image and mask columns and the void value), or allow "
            "more with --max-bad-fraction (in Python: max_bad_fraction=... of TrainingArguments or "
            "build_embedding_cache, max_fraction=... of BadSampleTracker)."
        )

    def _by_kind(self) -> Counter:
        return Counter(item["kind"] for item in self.details)

    def summary(self) -> dict[str, Any]:
        """`{"seen", "bad", "bad_fraction", "by_kind": {kind: count}, "samples": [{"name", "kind", "reason"}]}`."""
        return {
            "seen": self.seen,
            "bad": self.bad,
            "bad_fraction": self.bad_fraction,
            "by_kind": dict(self._by_kind()),
            "samples": list(self.details),
        }


__all__ = ["BadSampleTracker", "DataQualityError"]
