"""Benchmarks comparing PA-SAM with SAM and SAM-HQ on identical trunks.

Absolute times on a shared machine drift with its load, so every benchmark here runs the compared callables
interleaved (A B C A B C ...) after a warm-up and reports, per column, the median of the per-repetition ratios
with their interquartile range: a load change hits the neighbouring calls alike and cancels out of each ratio.

The compared models are built from one `SamConfig` and share every trunk tensor (`build_models`), so a ratio
measures only what PA-SAM (or SAM-HQ) adds. `quick=True` swaps in tiny configs so the whole suite runs in
seconds (the tests use it); the numbers that count come from the full ViT-B sized runs (`benchmarks/*.py`,
`pasam benchmark`).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from transformers import SamConfig, SamHQConfig, SamHQModel, SamModel, SamProcessor

from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from . import metrics
from .configuration_pasam import PASamConfig
from .image_processing_pasam import PASamImageProcessorPil
from .modeling_pasam import PASamModel
from .processing_pasam import PASamProcessor

# A checkout's ../shared/data (as the tests use it); PASAM_SHARED_DATA points elsewhere.
DEFAULT_DATA = Path(os.environ.get("PASAM_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
BENCHMARKS = ("decoder", "e2e", "processor", "amg", "memory", "precision", "train", "app")


# --------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Ratio:
    """Median of per-repetition ratios and their interquartile range."""

    median: float
    q1: float
    q3: float

    @classmethod
    def of(cls, numerators: Sequence[float], denominators: Sequence[float]) -> "Ratio":
        ratios = [a / b for a, b in zip(numerators, denominators)]
        return cls(*_quartiles(ratios))

    def is_finite(self) -> bool:
        return all(math.isfinite(value) for value in (self.median, self.q1, self.q3))

    def __str__(self) -> str:
        return f"{self.median:.3f} [{self.q1:.3f}-{self.q3:.3f}]"


@dataclass
class BenchmarkTable:
    """One benchmark's table: rows of absolute medians (`values`, e.g. seconds) and ratios (`ratios`)."""

    title: str
    value_columns: list[str]
    ratio_columns: list[str]
    rows: list[tuple[str, dict[str, float], dict[str, Ratio]]] = field(default_factory=list)
    value_unit: str = "ms"
    notes: list[str] = field(default_factory=list)

    def add_row(self, label: str, values: Mapping[str, float], ratios: Mapping[str, Ratio]) -> None:
        self.rows.append((label, dict(values), dict(ratios)))

    def all_ratios(self) -> list[Ratio]:
        return [ratio for _, _, ratios in self.rows for ratio in ratios.values()]

    def to_markdown(self) -> str:
        unit = f" ({self.value_unit})" if self.value_unit else ""
        header = ["case"] + [f"{name}{unit}" for name in self.value_columns] + self.ratio_columns
        lines = [f"### {self.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, values, ratios in self.rows:
            cells = [label] + [_format_value(values.get(name)) for name in self.value_columns]
            cells += [str(ratios[name]) if name in ratios else "-" for name in self.ratio_columns]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"


def _format_value(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def _quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


# --------------------------------------------------------------------------------------------------------------
# Settings, models and timing


@dataclass
class BenchmarkSettings:
    """What every benchmark takes: `quick` (tiny configs, few repetitions), device, dtype and repetition count."""

    quick: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    repeats: int | None = None
    data_dir: Path = DEFAULT_DATA
    seed: int = 0
    # A torch.compile backend ("inductor", "eager", ...) for the models of the decoder and end-to-end benchmarks.
    compile: str | None = None

    def num_repeats(self, full: int) -> int:
        if self.repeats is not None:
            return self.repeats
        return 3 if self.quick else full


def sam_config(quick: bool) -> SamConfig:
    """SAM ViT-B at 1024 (hidden 256 decoder, 64 x 64 embeddings) or, for `quick`, the tiny test config."""
    if not quick:
        return SamConfig(attn_implementation="sdpa")
    small = PASamConfig.small()
    decoder = small.mask_decoder_config.to_dict()
    sam_decoder_keys = set(SamConfig().mask_decoder_config.to_dict())
    decoder = {key: value for key, value in decoder.items() if key in sam_decoder_keys and key != "model_type"}
    return SamConfig(
        vision_config=small.vision_config.to_dict(),
        prompt_encoder_config=small.prompt_encoder_config.to_dict(),
        mask_decoder_config=decoder,
        attn_implementation="sdpa",
    )


def build_models(
    config: SamConfig,
    kinds: Iterable[str] = ("sam", "sam_hq", "pasam"),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, torch.nn.Module]:
    """SAM, SAM-HQ and PA-SAM in eval mode with identical trunk weights (seeded SAM init copied into the others).

    The adapter (PA-SAM) and HQ modules (SAM-HQ) keep their own seeded random initialisation. Raises if a trunk
    tensor fails to transfer, so a ratio can never compare different trunks.
    """
    torch.manual_seed(seed)
    sam = SamModel(config)
    state = sam.state_dict()
    models: dict[str, torch.nn.Module] = {}
    for kind in kinds:
        if kind == "sam":
            model = sam
        elif kind == "pasam":
            pasam_config = PASamConfig.from_sam_config(config)
            pasam_config._attn_implementation = config._attn_implementation
            torch.manual_seed(seed + 1)
            model = PASamModel(pasam_config)
            missing, unexpected = model.load_state_dict(state, strict=False)
            _check_transfer(kind, missing, unexpected, set(model.adapter_state_dict_keys()))
        elif kind == "sam_hq":
            torch.manual_seed(seed + 2)
            model = SamHQModel(sam_hq_config(config))
            own = model.state_dict()
            shared = {key: value for key, value in state.items() if key in own and own[key].shape == value.shape}
            if len(shared) != len(state):
                raise RuntimeError(f"SAM-HQ lacks SAM trunk tensors: {sorted(set(state) - set(shared))[:5]}")
            model.load_state_dict(shared, strict=False)
        else:
            raise ValueError(f"unknown model kind {kind!r}; use 'sam', 'sam_hq' or 'pasam'.")
        models[kind] = model.to(device=device, dtype=dtype).eval()
    return models


def sam_hq_config(config: SamConfig) -> SamHQConfig:
    decoder = {k: v for k, v in config.mask_decoder_config.to_dict().items() if k != "model_type"}
    decoder["vit_dim"] = config.vision_config.hidden_size
    hq_config = SamHQConfig(
        vision_config={k: v for k, v in config.vision_config.to_dict().items() if k != "model_type"},
        prompt_encoder_config={k: v for k, v in config.prompt_encoder_config.to_dict().items() if k != "model_type"},
        mask_decoder_config=decoder,
    )
    hq_config._attn_implementation = config._attn_implementation
    return hq_config


def _check_transfer(kind: str, missing: Sequence[str], unexpected: Sequence[str], allowed_missing: set[str]) -> None:
    if unexpected or set(missing) - allowed_missing:
        raise RuntimeError(
            f"{kind}: trunk weights did not transfer (missing {sorted(set(missing) - allowed_missing)[:5]}, "
            f"unexpected {list(unexpected)[:5]})."
        )


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_times(
    functions: Mapping[str, Callable[[], object]], repeats: int, warmup: int = 1, device: str = "cpu"
) -> dict[str, list[float]]:
    """Seconds per call of each function, run interleaved (A B C A B C ...) after `warmup` rounds."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            synchronize(device)
            start = time.perf_counter()
            function()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def ratio_row(
    times: Mapping[str, Sequence[float]], pairs: Mapping[str, tuple[str, str]], scale: float = 1e3
) -> tuple[dict[str, float], dict[str, Ratio]]:
    """Medians (scaled, ms by default) of every timed column and the requested ratios `{column: (num, den)}`."""
    values = {name: statistics.median(samples) * scale for name, samples in times.items()}
    ratios = {column: Ratio.of(times[num], times[den]) for column, (num, den) in pairs.items()}
    return values, ratios


def _autocast_free_inputs(inputs: Mapping[str, torch.Tensor], device: str, dtype: torch.dtype) -> dict:
    """Moves inputs to `device`; floating tensors (except prompts, which SAM keeps in float32) to `dtype`."""
    moved = {}
    for name, value in inputs.items():
        if torch.is_tensor(value):
            value = value.to(device)
            if value.is_floating_point() and name not in ("input_points", "input_boxes"):
                value = value.to(dtype)
        moved[name] = value
    return moved


def random_boxes(num_boxes: int, image_size: int, seed: int) -> torch.Tensor:
    """`(1, num_boxes, 4)` boxes (x0, y0, x1, y1) in the model's input frame, each at least an eighth of a side."""
    generator = torch.Generator().manual_seed(seed)
    corners = torch.rand(num_boxes, 2, 2, generator=generator) * image_size
    low = corners.min(dim=1).values
    high = torch.maximum(corners.max(dim=1).values, low + image_size / 8).clamp(max=image_size)
    return torch.cat([low, high], dim=-1).unsqueeze(0)


# --------------------------------------------------------------------------------------------------------------
# Images


def real_images(settings: BenchmarkSettings, count: int, subset: str = "davis345") -> list[np.ndarray] | None:
    """Up to `count` RGB photos from `data_dir/<subset>/images` (sorted names), or `None` when absent."""
    from PIL import Image

    folder = Path(settings.data_dir) / subset / "images"
    paths = sorted(folder.glob("*.jpg")) + sorted(folder.glob("*.png"))
    if not paths:
        return None
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths[:count]]


def synthetic_photo(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth RGB image with a few discs: stands in for photos in quick mode when no data is present."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    image = np.stack([(xx / width) * 160, (yy / height) * 160, np.full_like(xx, 60)], axis=-1)
    for _ in range(4):
        cy, cx, radius = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.1, 0.3) * min(height, width)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < radius**2] = rng.integers(0, 255, size=3)
    return image.astype(np.uint8)


def processors_for(config: SamConfig) -> dict[str, SamProcessor]:
    """A SAM processor and a PA-SAM processor with the same sizes (the model's input size)."""
    pasam = PASamProcessor.from_model_config(PASamConfig.from_sam_config(config))
    image_processor = pasam.image_processor
    # The same backend (torchvision or PIL) as the PA-SAM processor, so the ratio isolates the edge map.
    if isinstance(image_processor, PASamImageProcessorPil):
        sam_class = SamImageProcessorPil
    else:
        from transformers.models.sam.image_processing_sam import SamImageProcessor as sam_class
    sizes = {key: getattr(image_processor, key) for key in ("size", "pad_size", "mask_size", "mask_pad_size")}
    return {"sam": SamProcessor(image_processor=sam_class(**sizes)), "pasam": pasam}


# --------------------------------------------------------------------------------------------------------------
# Benchmarks


def decoder_inputs(models: Mapping[str, torch.nn.Module], config: SamConfig, num_boxes: int, seed: int) -> dict:
    """Per model kind, the decoder's inputs with everything image-side precomputed: image embeddings for all,
    `adapter_pixel_values` (what the processor returns) for PA-SAM, the encoder's intermediate embeddings for
    SAM-HQ. Random tensors of the right shapes: the decoder's cost does not depend on their values."""
    generator = torch.Generator().manual_seed(seed)
    embedding_size = config.prompt_encoder_config.image_embedding_size
    image_size = config.vision_config.image_size
    hidden = config.mask_decoder_config.hidden_size
    embeddings = torch.randn(1, hidden, embedding_size, embedding_size, generator=generator)
    boxes = random_boxes(num_boxes, image_size, seed)
    common = {"image_embeddings": embeddings, "input_boxes": boxes, "multimask_output": False}
    inputs = {}
    for kind in models:
        if kind == "pasam":
            adapter = torch.randn(1, 4, 4 * embedding_size, 4 * embedding_size, generator=generator)
            inputs[kind] = {**common, "adapter_pixel_values": adapter}
        elif kind == "sam_hq":
            num_global = len(config.vision_config.global_attn_indexes)
            shape = (1, embedding_size, embedding_size, config.vision_config.hidden_size)
            intermediate = [torch.randn(*shape, generator=generator) for _ in range(num_global)]
            inputs[kind] = {**common, "intermediate_embeddings": intermediate}
        else:
            inputs[kind] = dict(common)
    return inputs


def _move(inputs: Mapping, device: str, dtype: torch.dtype) -> dict:
    moved = {}
    for name, value in inputs.items():
        if isinstance(value, list):
            value = [item.to(device=device, dtype=dtype) for item in value]
        elif torch.is_tensor(value):
            keep_float32 = name in ("input_points", "input_boxes")  # SAM's prompt encoder takes float32 coordinates
            value = value.to(device=device, dtype=value.dtype if keep_float32 else dtype)
        moved[name] = value
    return moved


COMPILED_BENCHMARKS = ("decoder", "e2e")


def compiled(models: Mapping[str, torch.nn.Module], settings: BenchmarkSettings) -> dict[str, torch.nn.Module]:
    """The models under `torch.compile(backend=settings.compile)`, or unchanged when no backend is set.

    Every compared model is compiled alike, so the ratios stay like for like; the warm-up rounds of the benchmark
    absorb the compilation (and the recompilation for each new prompt count).
    """
    if not settings.compile:
        return dict(models)
    return {kind: torch.compile(model, backend=settings.compile) for kind, model in models.items()}


def _caller(model: torch.nn.Module, inputs: Mapping) -> Callable[[], object]:
    def call() -> object:
        with torch.inference_mode():
            return model(**inputs)

    return call


def bench_decoder(settings: BenchmarkSettings, prompt_counts: Sequence[int] = (1, 16, 64)) -> BenchmarkTable:
    """Prompt encoder + mask decoder from precomputed image-side inputs, 1 image, `P` box prompts."""
    config = sam_config(settings.quick)
    models = build_models(config, device=settings.device, dtype=settings.dtype, seed=settings.seed)
    table = BenchmarkTable(
        title="Mask decoder (prompt encoder + mask decoder, 1 image, P boxes)",
        value_columns=["sam", "sam_hq", "pasam"],
        ratio_columns=["pasam/sam", "pasam/sam_hq", "sam_hq/sam"],
    )
    timed_models = compiled(models, settings)
    for count in prompt_counts:
        inputs = decoder_inputs(models, config, count, settings.seed)
        functions = {
            kind: _caller(model, _move(inputs[kind], settings.device, settings.dtype))
            for kind, model in timed_models.items()
        }
        repeats = settings.num_repeats(15 if count < 64 else 9)
        times = interleaved_times(functions, repeats, warmup=2, device=settings.device)
        values, ratios = ratio_row(
            times,
            {"pasam/sam": ("pasam", "sam"), "pasam/sam_hq": ("pasam", "sam_hq"), "sam_hq/sam": ("sam_hq", "sam")},
        )
        table.add_row(f"P={count}", values, ratios)
    table.notes.append(_describe(settings, config, repeats))
    return table


def _describe(settings: BenchmarkSettings, config: SamConfig, repeats: int) -> str:
    size = "tiny (quick)" if settings.quick else "ViT-B"
    return (
        f"{size} trunk, input {config.vision_config.image_size}, device {settings.device}"
        f"{f' ({torch.get_num_threads()} torch threads)' if settings.device == 'cpu' else ''}, dtype "
        f"{str(settings.dtype).removeprefix('torch.')}"
        f"{f', torch.compile (backend {settings.compile})' if settings.compile else ''}, {repeats} interleaved "
        "repetitions; ratio = median of "
        "per-repetition ratios [interquartile range]."
    )


def bench_end_to_end(settings: BenchmarkSettings) -> BenchmarkTable:
    """Image encoder + prompt encoder + mask decoder, 1 image, 1 box. PA-SAM gets its `adapter_pixel_values`
    from the processor (timed in `bench_processor`), as in normal use."""
    config = sam_config(settings.quick)
    models = build_models(config, kinds=("sam", "pasam"), device=settings.device, dtype=settings.dtype)
    generator = torch.Generator().manual_seed(settings.seed)
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=generator)
    common = {"pixel_values": pixel_values, "input_boxes": random_boxes(1, size, settings.seed), "multimask_output": False}
    adapter = models["pasam"].compute_adapter_pixel_values(pixel_values)
    inputs = {"sam": common, "pasam": {**common, "adapter_pixel_values": adapter}}
    functions = {
        kind: _caller(model, _move(inputs[kind], settings.device, settings.dtype))
        for kind, model in compiled(models, settings).items()
    }
    repeats = settings.num_repeats(7)
    times = interleaved_times(functions, repeats, warmup=1, device=settings.device)
    table = BenchmarkTable(
        title="End to end (image encoder + decoder, 1 image, 1 box)",
        value_columns=["sam", "pasam"],
        ratio_columns=["pasam/sam"],
    )
    table.add_row("1 box", *ratio_row(times, {"pasam/sam": ("pasam", "sam")}))
    table.notes.append(_describe(settings, config, repeats))
    return table


def _photos(settings: BenchmarkSettings, count: int, table: BenchmarkTable, subset: str = "davis345") -> list:
    """Real photos, or in quick mode synthetic ones when the data is absent (noted in the table)."""
    images = real_images(settings, count, subset)
    if images is None:
        message = f"{Path(settings.data_dir) / subset} not found"
        if not settings.quick:
            table.notes.append(f"skipped: {message}.")
            return []
        table.notes.append(f"{message}: synthetic images instead.")
        images = [synthetic_photo(240 + 16 * index, 320, index) for index in range(count)]
    return images


def _processor_worker(connection, quick: bool, kind: str, threads: int, images: list) -> None:
    """One processor in its own process: times `processor(image i, its box)` for each index it is sent."""
    try:
        torch.set_num_threads(threads)
        processor = processors_for(sam_config(quick))[kind]
        connection.send("ready")
        while (index := connection.recv()) is not None:
            image = images[index]
            height, width = image.shape[:2]
            box = [[[width * 0.2, height * 0.2, width * 0.8, height * 0.8]]]
            start = time.perf_counter()
            processor(images=image, input_boxes=box, return_tensors="pt")
            connection.send(time.perf_counter() - start)
    except BaseException as error:  # noqa: BLE001 - reported in the parent
        connection.send(error)


class _ProcessorWorkers:
    """The SAM and PA-SAM processors, each in a spawned process, called in turn (never at the same time).

    In one process the two would share the allocator: each processor's large, short-lived tensors (12 MB an image)
    change whether the other's allocations are served from the heap or by fresh, page-faulting mappings, and the
    ratio moved between 0.55 and 1.2 from run to run with the order of calls. Apart, each keeps the allocator state
    it has in a real job (a DataLoader worker runs one processor), and the calls stay interleaved.
    """

    def __init__(self, quick: bool, threads: int, images: list) -> None:
        context = multiprocessing.get_context("spawn")
        self.connections, self.processes = {}, []
        # The waiting worker's OpenMP threads would otherwise spin on the cores the other one is timed on.
        saved = os.environ.get("OMP_WAIT_POLICY")
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            for kind in ("sam", "pasam"):
                parent, child = context.Pipe()
                process = context.Process(
                    target=_processor_worker, args=(child, quick, kind, threads, images), daemon=True
                )
                process.start()
                self.connections[kind] = parent
                self.processes.append(process)
        finally:
            if saved is None:
                os.environ.pop("OMP_WAIT_POLICY")
            else:
                os.environ["OMP_WAIT_POLICY"] = saved
        for kind in self.connections:
            self._receive(kind)

    def _receive(self, kind: str):
        connection = self.connections[kind]
        while not connection.poll(5):
            if not all(process.is_alive() for process in self.processes):
                raise RuntimeError(
                    f"the {kind} processor worker ended before reporting; call the benchmark under "
                    "`if __name__ == '__main__':` (the spawned process re-imports the calling script)."
                )
        result = connection.recv()
        if isinstance(result, BaseException):
            raise result
        return result

    def call(self, kind: str, index: int) -> float:
        self.connections[kind].send(index)
        return self._receive(kind)

    def close(self) -> None:
        for connection in self.connections.values():
            connection.send(None)
        for process in self.processes:
            process.join(timeout=30)


def bench_processor(settings: BenchmarkSettings) -> BenchmarkTable:
    """Per-image preprocessing with one box: PA-SAM's processor (adds the Canny edge map) vs SAM's, each in its own
    process (see [`_ProcessorWorkers`]), calls interleaved image by image."""
    table = BenchmarkTable(
        title="Processor (one image and one box per call)",
        value_columns=["sam", "pasam"],
        ratio_columns=["pasam/sam"],
    )
    images = _photos(settings, 4 if settings.quick else 40, table)
    if not images:
        return table
    repeats = settings.num_repeats(11)
    # A DataLoader worker runs its processor with one torch thread: the setting of a training or batch job.
    for threads in dict.fromkeys((torch.get_num_threads(), 1)):
        times: dict[str, list[float]] = {"sam": [], "pasam": []}
        workers = _ProcessorWorkers(settings.quick, threads, images)
        try:
            for index in range(len(images)):
                samples = {kind: [] for kind in times}
                for _ in range(repeats + 1):  # the first round warms up
                    for kind in times:
                        samples[kind].append(workers.call(kind, index))
                for kind in times:
                    times[kind].append(statistics.median(samples[kind][1:]))
        finally:
            workers.close()
        label = f"{len(images)} photos, {threads} torch thread{'s' if threads > 1 else ''}"
        table.add_row(label + (" (DataLoader worker)" if threads == 1 else ""),
                      *ratio_row(times, {"pasam/sam": ("pasam", "sam")}))
    table.notes.append(
        f"per image: median of {repeats} interleaved calls, each processor in its own process; ratio = median over "
        f"{len(images)} images [IQR]; {'tiny (quick)' if settings.quick else 'SAM 1024'} sizes."
    )
    return table


def bench_amg(settings: BenchmarkSettings) -> BenchmarkTable:
    """`pipeline("mask-generation")` on one photo with a 32 x 32 point grid (4 x 4 in quick mode)."""
    from transformers import pipeline

    config = sam_config(settings.quick)
    models = build_models(config, kinds=("sam", "pasam"), device=settings.device, dtype=settings.dtype)
    processors = processors_for(config)
    table = BenchmarkTable(
        title="Automatic mask generation (pipeline, one photo)",
        value_columns=["sam", "pasam"],
        ratio_columns=["pasam/sam"],
        value_unit="s",
    )
    images = _photos(settings, 1, table)
    if not images:
        return table
    from PIL import Image

    photo = Image.fromarray(images[0])
    grid = 4 if settings.quick else 32
    options = {"points_per_crop": grid, "points_per_batch": 64, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}
    functions = {}
    for kind, model in models.items():
        generator = pipeline(
            "mask-generation", model=model, image_processor=processors[kind].image_processor, device=settings.device
        )
        functions[kind] = lambda generator=generator: generator(photo, **options)
    repeats = settings.num_repeats(3)
    times = interleaved_times(functions, repeats, warmup=1, device=settings.device)
    table.add_row(f"{grid}x{grid} grid", *ratio_row(times, {"pasam/sam": ("pasam", "sam")}, scale=1.0))
    table.notes.append(_describe(settings, config, repeats))
    table.notes.append("thresholds at 0 so both models post-process every mask (random weights).")
    return table


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; falls back to the peak where /proc is absent)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _memory_probe(quick: bool, device: str, dtype: torch.dtype, kind: str, mode: str, num_boxes: int) -> float:
    """Peak memory (MiB) one `mode` run needs on top of the loaded model and inputs, in a fresh process.

    `mode="inference"`: encoder + decoder under inference mode, 1 box. `mode="train"`: frozen encoder under
    `no_grad`, then decoder forward + backward with gradients for the decoder only (`num_boxes` boxes).
    """
    import resource

    torch.set_num_threads(max(1, torch.get_num_threads()))
    config = sam_config(quick)
    model = build_models(config, kinds=(kind,), device=device, dtype=dtype)[kind]
    size = config.vision_config.image_size
    pixel_values = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    extra = {"adapter_pixel_values": model.compute_adapter_pixel_values(pixel_values)} if kind == "pasam" else {}
    extra = _move(extra, device, dtype)
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    boxes = random_boxes(num_boxes if mode == "train" else 1, size, 0).to(device)
    on_cuda = str(device).startswith("cuda")
    if on_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        import gc

        gc.collect()
        before = _rss_bytes()
    if mode == "inference":
        with torch.inference_mode():
            model(pixel_values=pixel_values, input_boxes=boxes, multimask_output=False, **extra)
    else:
        model.vision_encoder.requires_grad_(False)
        model.train()
        with torch.no_grad():
            embeddings = model.get_image_embeddings(pixel_values)
        outputs = model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=False, **extra)
        outputs.pred_masks.float().sigmoid().mean().backward()
    if on_cuda:
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return max(peak - before, 0) / 2**20


def _memory_probe_entry(queue, *args) -> None:
    try:
        queue.put(_memory_probe(*args))
    except BaseException as error:  # noqa: BLE001 - reported in the parent
        queue.put(error)


def measure_peak_memory(settings: BenchmarkSettings, kind: str, mode: str, num_boxes: int = 16) -> float:
    """Runs `_memory_probe` in a spawned process, so each peak is measured from a clean slate."""
    import queue as queue_module

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(
        target=_memory_probe_entry,
        args=(queue, settings.quick, settings.device, settings.dtype, kind, mode, num_boxes),
    )
    process.start()
    while True:
        # A child that dies before reporting (killed for memory, or a script without a __main__ guard, which the
        # spawned child re-runs) would leave a bare queue.get() waiting forever.
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not process.is_alive() and queue.empty():
                raise RuntimeError(
                    f"the memory probe ({kind}, {mode}) ended with exit code {process.exitcode} before reporting; "
                    "if it was not killed for memory, call the benchmark under `if __name__ == '__main__':` "
                    "(the spawned process re-imports the calling script)."
                ) from None
    process.join()
    if isinstance(result, BaseException):
        raise result
    return float(result)


def bench_memory(settings: BenchmarkSettings, num_boxes: int = 16) -> BenchmarkTable:
    """Peak memory of inference (encoder + decoder, 1 box) and of a decoder-only training step."""
    table = BenchmarkTable(
        title="Peak memory above the loaded model",
        value_columns=["sam", "pasam"],
        ratio_columns=["pasam/sam"],
        value_unit="MiB",
    )
    config = sam_config(settings.quick)
    cases = {"inference (encoder + decoder, 1 box)": "inference", f"decoder train step ({num_boxes} boxes)": "train"}
    for label, mode in cases.items():
        values = {kind: measure_peak_memory(settings, kind, mode, num_boxes) for kind in ("sam", "pasam")}
        # One measurement per cell: a clean process each; a tiny floor keeps the ratio finite for tiny models.
        ratio = max(values["pasam"], 1e-3) / max(values["sam"], 1e-3)
        table.add_row(label, values, {"pasam/sam": Ratio(ratio, ratio, ratio)})
    how = "torch.cuda.max_memory_allocated" if str(settings.device).startswith("cuda") else "peak RSS (getrusage)"
    table.notes.append(
        f"{'tiny (quick)' if settings.quick else 'ViT-B'} trunk at {config.vision_config.image_size}; {how} minus "
        "the memory in use before the call, each in a fresh process; train step: frozen encoder under no_grad, "
        "gradients for the decoder only."
    )
    return table




def precision_inputs(processor: PASamProcessor, photos: Sequence[tuple[np.ndarray, list[float]]]) -> list[dict]:
    """Processor outputs (pixel values, adapter input, one box) for `(image, box)` pairs."""
    inputs = []
    for image, box in photos:
        encoding = processor(images=image, input_boxes=[[box]], return_tensors="pt")
        inputs.append({key: encoding[key] for key in ("pixel_values", "adapter_pixel_values", "input_boxes")})
    return inputs


def seed_nontrivial_decoder(
    model: PASamModel, inputs: Sequence[Mapping], seeds: Iterable[int] = range(64), low: float = 0.05, high: float = 0.95
) -> int:
    """Re-initialise `model.mask_decoder` with the first seed whose masks are non-trivial on every input.

    Random weights often predict all-foreground or all-background masks, where a precision comparison proves
    nothing. PyTorch's default init of a fresh [`PASamMaskDecoder`] is drawn per seed until the foreground
    fraction of every fp32 mask lies in `[low, high]`. Returns the seed; raises if none qualifies.
    """
    from .modeling_pasam import PASamMaskDecoder

    model.eval()
    with torch.inference_mode():
        embedded = [
            {**item, "image_embeddings": model.get_image_embeddings(item["pixel_values"])} for item in inputs
        ]
    for seed in seeds:
        torch.manual_seed(seed)
        fresh = PASamMaskDecoder(model.config.mask_decoder_config)
        model.mask_decoder.load_state_dict(fresh.state_dict())
        with torch.inference_mode():
            fractions = [
                (
                    model(
                        image_embeddings=item["image_embeddings"],
                        adapter_pixel_values=item["adapter_pixel_values"],
                        input_boxes=item["input_boxes"],
                    ).pred_masks
                    > 0
                )
                .float()
                .mean()
                .item()
                for item in embedded
            ]
        if all(low <= fraction <= high for fraction in fractions):
            return seed
    raise RuntimeError(f"no seed gave foreground fractions in [{low}, {high}] on every input.")


def predict_masks(
    model: PASamModel, inputs: Sequence[Mapping], dtype: torch.dtype, device: str = "cpu", whole: bool = False
) -> list:
    """Boolean low-resolution masks of a copy of `model` in `dtype` (the caller's model is left untouched): cast as
    `from_pretrained(dtype=...)` loads (`to_inference_dtype`: prompt side in fp32 by default), or `whole`."""
    return _masks_of(_cast_copy(model, dtype, device, whole), inputs, dtype, device)


def _masks_of(model: PASamModel, inputs: Sequence[Mapping], dtype: torch.dtype, device: str) -> list:
    masks = []
    with torch.inference_mode():
        for item in inputs:
            outputs = model(**_move(item, device, dtype))
            masks.append((outputs.pred_masks.float() > 0).cpu())
    return masks


def _cast_copy(model: PASamModel, dtype: torch.dtype, device: str, whole: bool) -> PASamModel:
    import copy

    cast = copy.deepcopy(model).to(device=device)
    return (cast.to(dtype) if whole else cast.to_inference_dtype(dtype)).eval()


def precision_photos(settings: BenchmarkSettings, table: BenchmarkTable, count: int = 8) -> list:
    """hq-fixture photos with the box around their foreground; synthetic discs in quick mode without data."""
    import json

    from PIL import Image

    root = Path(settings.data_dir) / "hq-fixture"
    if (root / "manifest.json").is_file():
        photos = []
        for item in json.loads((root / "manifest.json").read_text())["items"][:count]:
            image = np.asarray(Image.open(root / item["image"]).convert("RGB"))
            rows, cols = np.nonzero(np.asarray(Image.open(root / item["mask"]).convert("L")) == 255)
            photos.append((image, [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]))
        return photos
    if not settings.quick:
        table.notes.append(f"skipped: {root} not found.")
        return []
    table.notes.append(f"{root} not found: synthetic images instead.")
    photos = []
    for index in range(2):
        image = synthetic_photo(200, 260, index)
        photos.append((image, [40.0, 40.0, 200.0, 160.0]))
    return photos


def bench_precision(settings: BenchmarkSettings, dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16)):
    """bf16/fp16 inference against fp32 on the same (non-trivial) random weights: mask IoU and speed."""
    table = BenchmarkTable(
        title="Reduced precision vs fp32 (PA-SAM, encoder + decoder, 1 box per photo)",
        value_columns=["fp32 ms", "dtype ms", "mean IoU", "min IoU"],
        ratio_columns=["dtype/fp32 time"],
        value_unit="",
    )
    photos = precision_photos(settings, table)
    if not photos:
        return table
    config = sam_config(settings.quick)
    model = build_models(config, kinds=("pasam",))["pasam"]
    inputs = precision_inputs(PASamProcessor.from_model_config(model.config), photos)
    seed = seed_nontrivial_decoder(model, inputs)
    # One copy per precision serves both its masks and its timing.
    reference_model = _cast_copy(model, torch.float32, settings.device, whole=False)
    reference = _masks_of(reference_model, inputs, torch.float32, settings.device)
    reference_call = _caller(reference_model, _move(inputs[0], settings.device, torch.float32))
    repeats = settings.num_repeats(3)
    for dtype in dtypes:
        for whole in (False, True):
            cast = _cast_copy(model, dtype, settings.device, whole)
            masks = _masks_of(cast, inputs, dtype, settings.device)
            ious = [metrics.mask_iou(a, b).item() for a, b in zip(masks, reference)]  # 1.0 when both are empty
            functions = {"fp32": reference_call, "low": _caller(cast, _move(inputs[0], settings.device, dtype))}
            times = interleaved_times(functions, repeats, warmup=1, device=settings.device)
            values, ratios = ratio_row(times, {"dtype/fp32 time": ("low", "fp32")})
            row_values = {"fp32 ms": values["fp32"], "dtype ms": values["low"], "mean IoU": statistics.mean(ious),
                          "min IoU": min(ious)}
            name = str(dtype).removeprefix("torch.")
            label = f"{name}, all modules" if whole else f"{name}, prompt side fp32 (default)"
            table.add_row(label, row_values, ratios)
    table.notes.append(
        f"{len(photos)} photos, decoder seed {seed} (non-trivial fp32 masks); {_describe(settings, config, repeats)}"
    )
    table.notes.append(
        "default: the copy is cast as from_pretrained(dtype=...) loads it (config.decoder_in_fp32: image encoder in "
        "the low dtype, positional embedding, prompt encoder and mask decoder in fp32); 'all modules': model.to(dtype)."
    )
    return table


# --------------------------------------------------------------------------------------------------------------
# Training step


def training_items(config: SamConfig, batch_size: int, seed: int, cached: bool) -> list[dict]:
    """`batch_size` training items as the dataset yields them: one object mask (a disc) each, `labels` `(1, S, S)`
    uint8, `adapter_pixel_values` `(4, A, A)` and either `pixel_values` `(3, S, S)` (the encoder runs in the step)
    or `image_embeddings` `(C, h, w)` (what [`EmbeddingCacheDataset`] yields). Random tensors, seeded, so the two
    kinds describe the same images: a step's cost does not depend on the values."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    embedding_size = config.prompt_encoder_config.image_embedding_size
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    items = []
    for index in range(batch_size):
        centre = (0.3 + 0.4 * torch.rand(2, generator=generator)) * size
        radius = (0.1 + 0.15 * torch.rand((), generator=generator)) * size
        labels = (((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) < radius**2).to(torch.uint8).unsqueeze(0)
        pixel_values = torch.randn(3, size, size, generator=generator)
        embeddings = torch.randn(config.mask_decoder_config.hidden_size, embedding_size, embedding_size,
                                 generator=generator)
        item = {
            "adapter_pixel_values": torch.randn(4, 4 * embedding_size, 4 * embedding_size, generator=generator),
            "labels": labels,
            "name": f"synthetic-{index}",
        }
        item["image_embeddings" if cached else "pixel_values"] = embeddings if cached else pixel_values
        items.append(item)
    return items


def training_batch(config: SamConfig, batch_size: int, seed: int, cached: bool, device: str = "cpu",
                   dtype: torch.dtype = torch.float32) -> dict:
    """A training batch made by [`PASamDataCollator`] from [`training_items`]: one box per image, drawn by the
    [`PromptSimulator`] from the object mask (noisy box, the trainer's box prompt)."""
    from .data import PASamDataCollator, PromptSimulator

    collator = PASamDataCollator(PromptSimulator(preset={"boxes": 1.0}, seed=seed))
    batch = collator(training_items(config, batch_size, seed, cached))
    tensors = {key: value for key, value in batch.items() if torch.is_tensor(value)}
    return _autocast_free_inputs(tensors, device, dtype)


def pasam_training_step(model: PASamModel, device: str = "cpu") -> Callable[[Mapping], torch.Tensor]:
    """The trainer's own step (`pasam_hf.training.loop._training_step`) on `model` with the release's trainable
    set (`mark_trainable`) and Adam: `step(batch)` runs forward, PA-SAM loss, backward and the optimizer step, and
    returns the loss. A batch with `pixel_values` runs the frozen encoder in the same forward, as the trainer
    does; one with `image_embeddings` (the embedding cache) skips it. Hard point mining is on (Gumbel top-k), as
    after the release's warm-up."""
    from accelerate import Accelerator

    from .training.arguments import TrainingArguments
    from .training.loop import _training_step, mark_trainable

    # _training_step reads only the gradient-clipping setting; `data` just satisfies the validation.
    args = TrainingArguments(output_dir=os.devnull, data="in-memory benchmark batch")
    # Timing on the CPU of a CUDA machine needs cpu=True; elsewhere the default keeps any existing state valid.
    on_cpu_beside_cuda = not str(device).startswith("cuda") and torch.cuda.is_available()
    accelerator = Accelerator(cpu=True) if on_cpu_beside_cuda else Accelerator()
    mark_trainable(model)
    model.train()
    model.set_point_mining(True)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate)

    def step(batch: Mapping) -> torch.Tensor:
        outcome, loss = _training_step(accelerator, model, optimizer, dict(batch), args)
        if outcome != "ok":
            raise RuntimeError("the benchmark's training step gave a non-finite loss; its timing would be wrong.")
        return loss

    return step


def sam_training_step(model: SamModel) -> Callable[[Mapping], torch.Tensor]:
    """SAM's decoder-only step with the same trainable set (the decoder's upscaling, first hypernetwork MLP and
    mask tokens; SAM has no adapter) and the mask terms of the PA-SAM loss (BCE + Dice on the single mask)."""
    from .losses import dice_loss, sigmoid_bce
    from .training.loop import mark_trainable

    mark_trainable(model)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def step(batch: Mapping) -> torch.Tensor:
        outputs = model(image_embeddings=batch["image_embeddings"], input_boxes=batch["input_boxes"],
                        multimask_output=False)
        labels = batch["labels"].flatten(0, 1)
        logits = torch.nn.functional.interpolate(
            outputs.pred_masks.flatten(0, 2).unsqueeze(1).float(), size=labels.shape[-2:], mode="bilinear"
        ).squeeze(1)
        valid = ((labels == 0) | (labels == 1)).float()
        targets = (labels == 1).float()
        loss = (sigmoid_bce(logits, targets, valid) + dice_loss(logits, targets, valid)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def bench_training(settings: BenchmarkSettings, batch_size: int = 4) -> BenchmarkTable:
    """One training step at batch 4 (one box per image): from the embedding cache vs with the frozen encoder in
    the loop, and PA-SAM's decoder-only step vs SAM's."""
    config = sam_config(settings.quick)
    models = build_models(config, kinds=("sam", "pasam"), device=settings.device, dtype=settings.dtype,
                          seed=settings.seed)
    batches = {
        kind: training_batch(config, batch_size, settings.seed, cached=(kind == "cached"), device=settings.device,
                             dtype=settings.dtype)
        for kind in ("cached", "encoder")
    }
    pasam_step = pasam_training_step(models["pasam"], settings.device)
    sam_step = sam_training_step(models["sam"])
    functions = {
        "pasam cached": lambda: pasam_step(batches["cached"]),
        "pasam encoder": lambda: pasam_step(batches["encoder"]),
        "sam cached": lambda: sam_step(batches["cached"]),
    }
    repeats = settings.num_repeats(5)
    times = interleaved_times(functions, repeats, warmup=1, device=settings.device)
    table = BenchmarkTable(
        title=f"Training step (batch {batch_size}, one box per image, frozen encoder)",
        value_columns=list(functions),
        ratio_columns=["cached/encoder", "pasam/sam cached"],
    )
    pairs = {"cached/encoder": ("pasam cached", "pasam encoder"), "pasam/sam cached": ("pasam cached", "sam cached")}
    table.add_row(f"B={batch_size}", *ratio_row(times, pairs))
    table.notes.append(_describe(settings, config, repeats))
    table.notes.append(
        "pasam: the trainer's step (_training_step: forward with labels, PA-SAM loss, backward, Adam on the "
        "release's trainable set, point mining on); 'encoder' runs the frozen image encoder under no_grad in the "
        "step, 'cached' takes the image embeddings as the embedding cache gives them (target cached/encoder <= "
        "0.1 at ViT-B). sam: same trainable set of SAM's decoder, BCE + Dice on the mask."
    )
    return table


BENCHMARK_FUNCTIONS: dict[str, Callable[[BenchmarkSettings], BenchmarkTable]] = {
    "decoder": bench_decoder,
    "e2e": bench_end_to_end,
    "processor": bench_processor,
    "amg": bench_amg,
    "memory": bench_memory,
    "precision": bench_precision,
    "train": bench_training,
    "app": lambda settings: _bench_app(settings),
}


def _bench_app(settings: BenchmarkSettings) -> BenchmarkTable:
    # Imported when run: pasam_hf.app builds on this module.
    from .app.benchmark import bench_app

    return bench_app(settings)


def run_benchmarks(names: Iterable[str], settings: BenchmarkSettings) -> list[BenchmarkTable]:
    """Runs the named benchmarks (`BENCHMARKS`) in order and prints each table as it completes."""
    tables = []
    for name in names:
        if name not in BENCHMARK_FUNCTIONS:
            raise ValueError(f"unknown benchmark {name!r}; use one of {', '.join(BENCHMARKS)} or 'all'.")
        table = BENCHMARK_FUNCTIONS[name](settings)
        if settings.compile and name not in COMPILED_BENCHMARKS:
            table.notes.append(f"--compile applies to {' and '.join(COMPILED_BENCHMARKS)} only: this one ran eagerly.")
        print(table.to_markdown(), flush=True)
        tables.append(table)
    return tables


def script_main(name: str, argv: Sequence[str] | None = None) -> int:
    """Entry point of `benchmarks/bench_<name>.py`: `--quick`, `--device`, `--dtype`, `--repeats`."""
    import argparse

    parser = argparse.ArgumentParser(description=f"PA-SAM benchmark: {name}")
    add_benchmark_arguments(parser)
    args = parser.parse_args(argv)
    run_benchmarks([name], settings_from_args(args))
    return 0


def add_benchmark_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny models and few repetitions (a smoke test)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default: float32)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repetitions per case")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="folder with davis345/ and hq-fixture/")
    parser.add_argument("--compile", nargs="?", type=_compile_backend, const="inductor", default=None,
                        metavar="BACKEND",
                        help="torch.compile the models of the decoder and e2e benchmarks (default backend: inductor)")
    parser.add_argument("--threads", type=_thread_count, default=None,
                        help="torch CPU threads (default: torch's, one per core); the tables say which was used")


def _compile_backend(text: str) -> str:
    """argparse type of --compile: an unknown backend is argparse's usage error (exit code 2), listing the known."""
    import argparse

    import torch._dynamo

    if text not in torch._dynamo.list_backends(exclude_tags=()):
        # The debug and testing backends are accepted but not offered.
        offered = sorted({"eager", *torch._dynamo.list_backends()})
        raise argparse.ArgumentTypeError(f"unknown torch.compile backend {text!r}; use one of {', '.join(offered)}")
    return text


def _thread_count(text: str) -> int:
    """argparse type of --threads: a bad value is argparse's usage error (exit code 2), naming the fix."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of threads, at least 1; got {text!r}")
    return value


def settings_from_args(args) -> BenchmarkSettings:
    from .loading import resolve_dtype

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    return BenchmarkSettings(
        quick=args.quick, device=args.device, dtype=resolve_dtype(args.dtype), repeats=args.repeats,
        data_dir=args.data_dir, compile=args.compile,
    )
