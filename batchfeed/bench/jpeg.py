"""The JPEG rows of ``batchfeed bench`` (``--workload jpeg``, issue 14): training images decoded
and augmented from a folder of JPEG files, by batchfeed's workers and by torch's DataLoader.

Two image sets, each a folder of ``IMAGES`` real JPEGs (Pillow, quality 90) in torchvision's
``ImageFolder`` layout, 10 classes of textures (stripes, checks, a disc) in two colour schemes
with lighting and grain: 64x64 cropped to 32x32 (batches of 256), and 256x256 cropped to
224x224 (batches of 64).  Every row does the same work per image: decode, a random-resized-crop
(torchvision's sampling: area 8-100 %, aspect 3/4-4/3), a left-right flip of half the images,
normalise to float32 CHW with the ImageNet mean and std; batches are consumed and not copied
(``measure.consume``).  Per set:

- batchfeed, 1 and 2 workers: ``batchfeed serve --data DIR --transform
  "batchfeed.transforms:train_images(size=S)"``, a ``Client`` in this process on the same-host
  fast path (``ipc://``, what a same-host trainer uses);
- torch's DataLoader, ``num_workers`` 1 and 2: an ``ImageFolder`` over the folder with
  torchvision's transforms if torchvision imports, else the same thing written out
  (``FolderImages`` and ``TrainAugment``: Pillow's full decode, then torchvision's code path
  line for line), the default collate, persistent workers;
- batchfeed with two servers of 1 worker each sharing the decode of one job,
  ``Client([address1, address2])``; and batchfeed over tcp loopback with 2 workers.

The rows take turns, ``ROUNDS`` times over (once with ``--quick``), and each keeps its best
round: the machine is shared, and a round that another job slowed down says little.  Beside
images/s, each row gives the CPU that the client, the loader (servers or DataLoader workers)
and the rest of the machine used in its window, so that a 2-worker row that did not get two
cores shows it.

Servers are stopped by ``served.running_server``, the DataLoaders' workers by
``tokens.shutdown_loader``, both in ``finally``; the folders live in a temporary directory
removed at the end (also on an error, or SIGTERM, which ``run`` turns into an exception).
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchfeed.launch import ServerProcess
from batchfeed.shared.errors import BatchfeedError
from batchfeed.shared.procs import children, cpu_seconds
from batchfeed.shared.shm import PREFIX

from .measure import BenchError, Measurement, consume, failed_status
from .pool import client_epochs
from .probes import server_cpu_seconds
from .report import fmt, goal_line, text_table
from .served import running_server
from .tokens import shutdown_loader
from .workloads import MIB, BenchOptions

IMAGES = 20_000  # JPEG files per set
QUICK_IMAGES = 500
QUALITY = 90
CHUNK = 250  # images per generating task
MIN_SECONDS = 5.0  # a 256x256 batch takes ~0.1-0.3 s: measure longer than the other sections
MIN_WARMUP = 1.0
ROUNDS = 2  # each row runs this often (rows in turn), and keeps its best round (not --quick)
GOAL_VS_TORCH = 1.5  # batchfeed over torch's DataLoader with as many worker processes
GOAL_SCALING = 1.8  # batchfeed 2 workers over 1
SHM = "/dev/shm"  # where a server names its segments bf_<pid>_... (shared.shm)
LOADER_TIMEOUT = 120.0  # a DataLoader worker's batch, on a loaded 2-core machine
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ROW_BATCHFEED = "batchfeed fast path, {n} worker{s}"
ROW_TORCH = "torch DataLoader, {n} worker{s}"
ROW_TWO_SERVERS = "batchfeed fast path, 2 servers x 1 worker"
ROW_TCP = "batchfeed tcp, 2 workers"
WORKERS = (1, 2)


def _plural(template: str, n: int) -> str:
    return template.format(n=n, s="" if n == 1 else "s")


JPEG_ROWS = (_plural(ROW_BATCHFEED, 1), _plural(ROW_TORCH, 1), _plural(ROW_BATCHFEED, 2),
             _plural(ROW_TORCH, 2), ROW_TWO_SERVERS, ROW_TCP)  # run in this order, per set


@dataclass(frozen=True)
class ImageSet:
    """One set of the section: a folder of ``images`` JPEGs of ``image_size`` square pixels,
    cropped to ``crop`` square, read in batches of ``batch_size``."""

    name: str
    image_size: int
    crop: int
    batch_size: int
    images: int

    @property
    def transform(self) -> str:
        return f"batchfeed.transforms:train_images(size={self.crop})"

    @property
    def slot_mb(self) -> int:
        """``--slot-mb`` for one batch of float32 crops and int64 labels (a batch must fit in
        a slot; the default slot, 8 MiB, holds 13 images of 224x224)."""
        return math.ceil(self.batch_size * (3 * self.crop**2 * 4 + 8) / MIB)

    def describe(self) -> str:
        return (f"{self.name}: {self.images:,} JPEGs of {self.image_size}x{self.image_size} -> "
                f"random-resized-crop to {self.crop}x{self.crop}, batches of {self.batch_size}")


def image_sets(quick: bool) -> tuple[ImageSet, ...]:
    n = QUICK_IMAGES if quick else IMAGES
    return (ImageSet("64px", 64, 32, 256, n), ImageSet("256px", 256, 224, 64, n))


# ---------------------------------------------------------------------------------------------
# The image folders

TEXTURES = ("rows", "columns", "diagonals", "checks", "disc")
SCHEMES = ("warm", "cool")
# (foreground, background) RGB of the two colour schemes; class = texture + 5 * scheme.
PALETTES = np.array([[[230, 110, 40], [30, 60, 150]],
                     [[70, 220, 90], [150, 40, 130]]], np.float32)


def class_name(label: int) -> str:
    return f"{TEXTURES[label % 5]}-{SCHEMES[label // 5]}"


def texture_mask(texture: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) bool: where an image's foreground is, for textures 0..4 (a random period,
    phase and, for the disc, centre and radius)."""
    yy, xx = np.arange(size)[:, None], np.arange(size)[None, :]
    period = int(rng.integers(max(4, size // 12), max(5, size // 4) + 1))
    stripe = (np.arange(3 * size) + int(rng.integers(0, period))) % period < period / 2
    if texture == 0:
        return np.broadcast_to(stripe[:size, None], (size, size))
    if texture == 1:
        return np.broadcast_to(stripe[None, :size], (size, size))
    if texture == 2:  # either diagonal: a flip maps one to the other
        return stripe[xx + int(rng.choice([-1, 1])) * yy + size]
    if texture == 3:
        return stripe[:size, None] ^ stripe[None, :size]
    cy, cx = rng.uniform(0.3, 0.7, 2) * size
    radius = rng.uniform(0.18, 0.32) * size
    return (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2


def textured_image(label: int, size: int, grain: np.ndarray,
                   rng: np.random.Generator) -> np.ndarray:
    """One image of class ``label``, uint8 (3, size, size): its texture in its scheme's colours
    (jittered), a smooth lighting wave, and sensor grain cut from ``grain`` (3, 2 size, 2 size)."""
    mask = texture_mask(label % 5, size, rng)
    fg, bg = (PALETTES[label // 5] + rng.normal(0, 25, (2, 3))).astype(np.int16)
    img = np.where(mask, fg[:, None, None], bg[:, None, None])
    grid = (2 * np.pi / size) * np.arange(size, dtype=np.float32)
    fy, fx = rng.uniform(-1.5, 1.5, 2)
    phase, amplitude = rng.uniform(0, 2 * np.pi), rng.uniform(10, 35)
    light = np.outer(amplitude * np.sin(fy * grid + phase), np.cos(fx * grid))
    light += np.outer(amplitude * np.cos(fy * grid + phase), np.sin(fx * grid))
    img += light.astype(np.int16)
    top, left = rng.integers(0, size, 2)
    img += grain[:, top : top + size, left : left + size]
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def _write_chunk(directory: Path, size: int, first: int, count: int, seed: int) -> int:
    """Images ``first`` .. ``first + count - 1`` (a pure function of the seed and ``first``),
    each written as ``<class>/<index>.jpg``; returns the bytes written."""
    from PIL import Image

    rng = np.random.default_rng([seed, size, first])
    grain = rng.normal(0, 8, (3, 2 * size, 2 * size)).astype(np.int16)
    written = 0
    for index, label in enumerate(rng.integers(0, 10, count).tolist(), start=first):
        img = textured_image(label, size, grain, rng)
        rgb = Image.merge("RGB", [Image.fromarray(channel) for channel in img])
        path = directory / class_name(label) / f"{index:06d}.jpg"
        rgb.save(path, "JPEG", quality=QUALITY)
        written += path.stat().st_size
    return written


def write_image_set(spec: ImageSet, directory: str, seed: int) -> dict[str, Any]:
    """Write the set's folder (threads: Pillow's encoder and numpy release the GIL); what it
    holds, as a JSON-ready dict."""
    t0 = time.perf_counter()
    root = Path(directory)
    for label in range(10):
        (root / class_name(label)).mkdir(parents=True)
    starts = range(0, spec.images, CHUNK)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        sizes = list(pool.map(lambda first: _write_chunk(
            root, spec.image_size, first, min(CHUNK, spec.images - first), seed), starts))
    total = sum(sizes)
    return {**asdict(spec), "directory": directory, "bytes": total,
            "mean_bytes": total / spec.images,
            "bits_per_pixel": 8 * total / spec.images / spec.image_size**2,
            "write_s": time.perf_counter() - t0, "description": spec.describe()}


# ---------------------------------------------------------------------------------------------
# torch's side: ImageFolder and torchvision's training transforms, or the same written out


def pil_loader(path: str) -> Any:
    """torchvision's ``pil_loader``: open the file, decode it whole, convert to RGB."""
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert("RGB")


class FolderImages:
    """A map-style ``Dataset`` over an ``ImageFolder`` layout, as torchvision's ImageFolder
    lists it (classes are the sorted sub-directories, files sorted within each): item i is
    ``(transform(pil_loader(path)), label)``."""

    def __init__(self, root: str, transform: Callable[[Any], Any]):
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        self.samples = [(os.path.join(root, name, f), label)
                        for label, name in enumerate(self.classes)
                        for f in sorted(os.listdir(os.path.join(root, name)))]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        path, label = self.samples[i]
        return self.transform(pil_loader(path)), label


class TrainAugment:
    """``Compose([RandomResizedCrop(size), RandomHorizontalFlip(), ToTensor(), Normalize(...)])``
    on a PIL image, written out as torchvision runs it: the crop's box drawn with torch's RNG
    (``RandomResizedCrop.get_params``), ``crop`` then bilinear ``resize`` by Pillow, the flip by
    Pillow, then the numpy array to a float tensor, divided by 255 and normalised in place."""

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        import torch

        self.size, self.scale, self.ratio = size, scale, ratio
        self.mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD)[:, None, None]

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """``RandomResizedCrop.get_params``: (top, left, height, width)."""
        import torch

        area = height * width
        log_ratio = torch.log(torch.tensor(self.ratio)).tolist()
        for _ in range(10):
            target_area = area * torch.empty(1).uniform_(self.scale[0], self.scale[1]).item()
            aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1]).item())
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, size=(1,)).item())
                left = int(torch.randint(0, width - w + 1, size=(1,)).item())
                return top, left, h, w
        in_ratio = width / height  # fallback: a centre crop
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            h, w = height, int(round(height * max(self.ratio)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def __call__(self, img: Any) -> Any:
        import torch
        from PIL import Image

        top, left, h, w = self.crop_box(img.width, img.height)
        img = img.crop((left, top, left + w, top + h)).resize((self.size, self.size),
                                                             Image.Resampling.BILINEAR)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, copy=True)).permute(2, 0, 1).contiguous()
        x = x.to(dtype=torch.float32).div(255)
        return x.clone().sub_(self.mean).div_(self.std)  # Normalize(inplace=False) clones


def torch_dataset(root: str, size: int) -> tuple[Any, str]:
    """torchvision's ImageFolder and transforms if torchvision imports, else ``FolderImages``
    with ``TrainAugment``; and a sentence saying which (and why)."""
    try:
        import torchvision
        from torchvision import datasets, transforms
    except Exception as exc:  # a CUDA build beside a CPU torch fails with RuntimeError
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:120]
        return (FolderImages(root, TrainAugment(size)),
                f"torchvision does not import ({reason}); its ImageFolder, pil_loader and "
                "RandomResizedCrop + RandomHorizontalFlip + ToTensor + Normalize are written "
                "out line for line (batchfeed.bench.jpeg.FolderImages, TrainAugment)")
    compose = transforms.Compose([
        transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
        transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return (datasets.ImageFolder(root, compose),
            f"torchvision {torchvision.__version__} ImageFolder + RandomResizedCrop + "
            "RandomHorizontalFlip + ToTensor + Normalize")


@contextlib.contextmanager
def torch_batches(dataset: Any, batch_size: int, workers: int,
                  seed: int) -> Iterator[tuple[Iterator[Any], Callable[[], list[int]]]]:
    """Epoch after epoch of a DataLoader with ``workers`` persistent workers (small epochs do
    not pay a restart: the baseline at its best), forked, default collate; and a function
    giving its workers' pids.  The workers are shut down on exit."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=True, timeout=LOADER_TIMEOUT,
                        generator=torch.Generator().manual_seed(seed),
                        multiprocessing_context="fork")

    def epochs() -> Generator[Any, None, None]:
        while True:
            yield from loader

    def pids() -> list[int]:
        iterator = getattr(loader, "_iterator", None)
        return [w.pid for w in getattr(iterator, "_workers", [])]

    batches = epochs()
    try:
        yield batches, pids
    finally:
        batches.close()
        shutdown_loader(loader)


# ---------------------------------------------------------------------------------------------
# One row


@dataclass
class ImageRow:
    """One line of a set's table."""

    name: str
    set: str = ""
    status: str = "ok"  # "ok", "not installed", or "failed: ..."
    loader: str = ""  # "batchfeed" or "torch"
    workers: int | None = None  # decoding processes, over all servers
    transport: str = ""  # "fast path", "tcp" or "in-process"
    images: int | None = None
    seconds: float | None = None
    images_per_s: float | None = None
    mb_per_s: float | None = None  # delivered (float32 images and labels)
    vs_torch: float | None = None  # over torch's DataLoader with as many worker processes
    vs_one_worker: float | None = None  # over the same loader's 1-worker row
    first_batch_ms: float | None = None
    client_cpu_cores: float | None = None  # this process's CPU seconds per second
    loader_cpu_cores: float | None = None  # the servers' or the DataLoader workers'
    other_cpu_cores: float | None = None  # the rest of the machine's busy CPU (/proc/stat)
    loader_cpu_ms_per_image: float | None = None
    server_start_s: float | None = None  # batchfeed: start to ready (the folder loaded)
    runs_images_per_s: list[float] = field(default_factory=list)  # every round's; best kept

    @classmethod
    def from_measurement(cls, name: str, spec: ImageSet, m: Measurement, cpu: CpuWindow,
                         **extra: Any) -> ImageRow:
        return cls(name, set=spec.name, images=m.samples, seconds=m.seconds,
                   images_per_s=m.samples / m.seconds, mb_per_s=m.nbytes / m.seconds / 1e6,
                   first_batch_ms=None if m.first_batch_s is None else m.first_batch_s * 1e3,
                   client_cpu_cores=m.cpu_s / m.seconds,
                   loader_cpu_cores=cpu.loader_s / m.seconds,
                   other_cpu_cores=max(0.0, cpu.machine_s - cpu.loader_s - m.cpu_s) / m.seconds,
                   loader_cpu_ms_per_image=cpu.loader_s / m.samples * 1e3 if m.samples else None,
                   runs_images_per_s=[m.samples / m.seconds], **extra)


def _window(options: BenchOptions) -> tuple[float, float]:
    """(warm-up, measured) seconds per row: at least ``MIN_WARMUP`` and ``MIN_SECONDS``
    unless ``--quick``."""
    if options.quick:
        return options.warmup, options.seconds
    return max(options.warmup, MIN_WARMUP), max(options.seconds, MIN_SECONDS)


@dataclass(frozen=True)
class CpuWindow:
    """CPU seconds spent in a measured window: by the loader (the servers, or the DataLoader's
    workers), and by the whole machine (every process, this one included)."""

    loader_s: float
    machine_s: float


def machine_busy_seconds() -> float:
    """The CPU seconds all cores of this machine have been busy since boot (/proc/stat: user,
    nice, system, irq, softirq and steal, the time the hypervisor gave to other guests)."""
    with open("/proc/stat") as f:
        ticks = [int(v) for v in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # less idle, iowait


def _measure(batches: Iterator[Any], options: BenchOptions, start: float,
             loader_cpu: Callable[[], float]) -> tuple[Measurement, CpuWindow]:
    """The consumer's measurement, and the CPU spent in the same window."""
    warmup, seconds = _window(options)
    at_start: list[float] = []

    def ready() -> bool:
        at_start[:] = [loader_cpu(), machine_busy_seconds()]
        return True

    m = consume(batches, warmup, seconds, start, ready)
    return m, CpuWindow(loader_cpu() - at_start[0], machine_busy_seconds() - at_start[1])


def batchfeed_row(name: str, spec: ImageSet, servers: list[ServerProcess], workers: int,
                  options: BenchOptions, fastpath: bool, started_s: float) -> ImageRow:
    """A ``Client`` in this process over ``servers`` (one address, or all of them), which run
    ``workers`` worker processes in all."""
    from batchfeed import Client

    addresses = [s.address for s in servers if s.address is not None]
    start = time.perf_counter()  # the connect starts with the constructor
    with Client(addresses if len(addresses) > 1 else addresses[0], batch_size=spec.batch_size,
                seed=options.seed, fastpath=fastpath, reconnect_timeout=10.0,
                name="bench-jpeg") as client:
        _check_served(client, spec)
        batches = client_epochs(client)
        try:
            m, cpu = _measure(batches, options, start,
                              lambda: sum(server_cpu_seconds(s) for s in servers))
        finally:
            batches.close()
    return ImageRow.from_measurement(name, spec, m, cpu, loader="batchfeed", workers=workers,
                                     transport="fast path" if fastpath else "tcp",
                                     server_start_s=started_s)


def _check_served(client: Any, spec: ImageSet) -> None:
    """The server serves the set's classes, and float32 CHW images of the crop's size."""
    fields = {f.name: f for f in client.fields}
    image = fields.get("image")
    if image is None or str(image.dtype) != "float32" or \
            tuple(image.shape) != (3, spec.crop, spec.crop):
        raise BenchError(f"the server serves {list(fields.values())}, not float32 images "
                         f"(3, {spec.crop}, {spec.crop})")
    expected = tuple(sorted(class_name(label) for label in range(10)))
    if tuple(client.classes) != expected:
        raise BenchError(f"the server's classes are {client.classes}, not {expected}")


def torch_row(name: str, spec: ImageSet, dataset: Any, workers: int,
              options: BenchOptions) -> ImageRow:
    start = time.perf_counter()
    with torch_batches(dataset, spec.batch_size, workers, options.seed) as (batches, pids):
        m, cpu = _measure(batches, options, start, lambda: cpu_seconds(pids()))
    return ImageRow.from_measurement(name, spec, m, cpu, loader="torch", workers=workers,
                                     transport="in-process")


@contextlib.contextmanager
def running_servers(count: int, workers: int, spec: ImageSet, directory: str, bind: str,
                    problems: list[str]) -> Iterator[tuple[list[ServerProcess], float]]:
    """``count`` servers of the set's folder (``bind`` formatted with the server's index);
    and how long each took to start, on average.  All stopped on exit, and a shared-memory
    segment one of them left behind is a problem."""
    args = ["--workers", str(workers), "--data", directory, "--transform", spec.transform,
            "--slot-mb", str(spec.slot_mb)]
    pids: list[int] = []
    t0 = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            servers = []
            for i in range(count):
                servers.append(stack.enter_context(running_server(args, bind.format(i=i),
                                                                  problems)))
                pids.append(servers[-1].pid)
            yield servers, (time.perf_counter() - t0) / count
    finally:
        left = [name for name in os.listdir(SHM)
                if any(name.startswith(f"{PREFIX}{pid}_") for pid in pids)]
        if left:
            problems.append(f"stopped servers left shared memory behind: {', '.join(left)}")


def set_rows(spec: ImageSet, directory: str, options: BenchOptions, work_dir: str,
             progress: Callable[[str], None], problems: list[str]) -> tuple[list[ImageRow], str]:
    """The set's rows, in ``JPEG_ROWS`` order (batchfeed and torch alternate, so that a slow
    spell of the shared machine does not fall on one side only); and the torch baseline."""
    try:
        import torch  # noqa: F401

        dataset, baseline = torch_dataset(directory, spec.crop)
    except ImportError:
        dataset, baseline = None, "torch is not installed"
    ipc = f"ipc://{work_dir}/{spec.name}-{{i}}.sock"
    plans: dict[str, Callable[[], ImageRow]] = {}
    for n in WORKERS:
        plans[_plural(ROW_BATCHFEED, n)] = functools.partial(
            _served_row, _plural(ROW_BATCHFEED, n), spec, directory, 1, n, ipc, True, options,
            problems)
        if dataset is not None:
            plans[_plural(ROW_TORCH, n)] = functools.partial(
                torch_row, _plural(ROW_TORCH, n), spec, dataset, n, options)
    plans[ROW_TWO_SERVERS] = functools.partial(
        _served_row, ROW_TWO_SERVERS, spec, directory, 2, 1, ipc, True, options, problems)
    plans[ROW_TCP] = functools.partial(
        _served_row, ROW_TCP, spec, directory, 1, 2, "tcp://127.0.0.1:0", False, options,
        problems)
    runs: dict[str, list[ImageRow]] = {name: [] for name in JPEG_ROWS}
    for round_ in range(_rounds(options)):
        for name in JPEG_ROWS:
            if name not in plans:
                runs[name].append(ImageRow(name, set=spec.name, status="not installed (torch)"))
                continue
            progress(f"jpeg: {spec.name}, {name} (round {round_ + 1})")
            runs[name].append(_guarded(name, spec, plans[name]))
    rows = [_best(tries) for tries in runs.values()]
    _add_ratios(rows)
    return rows, baseline


def _rounds(options: BenchOptions) -> int:
    return 1 if options.quick else ROUNDS


def _best(tries: list[ImageRow]) -> ImageRow:
    """The round with the most images/s (the one least disturbed by the machine's other
    work), knowing every round's rate; a failed row if any round failed."""
    failed = [r for r in tries if r.status != "ok"]
    if failed:
        return failed[0]
    best = max(tries, key=lambda r: r.images_per_s or 0.0)
    best.runs_images_per_s = [rate for r in tries for rate in r.runs_images_per_s]
    return best


def _served_row(name: str, spec: ImageSet, directory: str, count: int, workers: int,
                bind: str, fastpath: bool, options: BenchOptions,
                problems: list[str]) -> ImageRow:
    with running_servers(count, workers, spec, directory, bind, problems) as (servers, took):
        return batchfeed_row(name, spec, servers, count * workers, options, fastpath, took)


def _guarded(name: str, spec: ImageSet, measure: Callable[[], ImageRow]) -> ImageRow:
    try:
        return measure()
    except (BenchError, BatchfeedError, RuntimeError, OSError) as exc:
        return ImageRow(name, set=spec.name, status=failed_status(exc))


def _add_ratios(rows: list[ImageRow]) -> None:
    """``vs_torch``: over the torch row with as many worker processes; ``vs_one_worker``: the
    2-worker rows over their 1-worker row, and two 1-worker servers over one."""
    by_name = {r.name: r for r in rows if r.images_per_s}

    def ratio(row: ImageRow, base_name: str) -> float | None:
        base = by_name.get(base_name)
        return None if base is None or row.images_per_s is None \
            else row.images_per_s / base.images_per_s  # type: ignore[operator]

    for r in rows:
        if r.loader == "batchfeed" and r.workers is not None:
            r.vs_torch = ratio(r, _plural(ROW_TORCH, r.workers))
        if r.workers == 2:
            one = _plural(ROW_TORCH if r.loader == "torch" else ROW_BATCHFEED, 1)
            r.vs_one_worker = ratio(r, one)


# ---------------------------------------------------------------------------------------------
# The section


def goals(rows: list[ImageRow], sets: tuple[ImageSet, ...]) -> list[dict[str, Any]]:
    """Each goal of issue 14, per set, with what this run measured and whether it was met."""
    by_name = {(r.set, r.name): r for r in rows}
    out: list[dict[str, Any]] = []
    for spec in sets:

        def measured(name: str, attr: str, set_name: str = spec.name) -> float | None:
            row = by_name.get((set_name, name))
            return None if row is None else getattr(row, attr)

        for n in WORKERS:
            out.append({"goal": f"{spec.name}: batchfeed >= {GOAL_VS_TORCH:g}x torch "
                                f"DataLoader, {n} worker{'' if n == 1 else 's'} each",
                        "measured": measured(_plural(ROW_BATCHFEED, n), "vs_torch"),
                        "target": GOAL_VS_TORCH, "higher_is_better": True})
        out.append({"goal": f"{spec.name}: batchfeed 2 workers >= {GOAL_SCALING:g}x 1 worker",
                    "measured": measured(_plural(ROW_BATCHFEED, 2), "vs_one_worker"),
                    "target": GOAL_SCALING, "higher_is_better": True,
                    "beside": {"torch": measured(_plural(ROW_TORCH, 2), "vs_one_worker")}})
    for g in out:
        g["met"] = None if g["measured"] is None else g["measured"] >= g["target"]
    return out


def _versions() -> dict[str, str]:
    """The image libraries installed here (batchfeed.images picks among them)."""
    out = {}
    for dist in ("pillow", "simplejpeg", "opencv-python-headless", "opencv-python", "torch",
                 "torchvision"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[dist] = importlib.metadata.version(dist)
    return out


def _leftovers(before: set[int]) -> list[str]:
    """Child processes that this section started and that still run."""
    return [f"process {pid} still running after the section"
            for pid in sorted(set(children(os.getpid())) - before)]


def jpeg_section(options: BenchOptions, progress: Callable[[str], None]) -> dict[str, Any]:
    """The whole JPEG section: per set, write the folder, measure its rows; then the goals."""
    started = time.perf_counter()
    sets = image_sets(options.quick)
    warmup, seconds = _window(options)
    result: dict[str, Any] = {"sets": {}, "rows": [], "goals": [], "problems": [],
                              "warmup_s": warmup, "seconds": seconds,
                              "rounds": _rounds(options), "baseline": "",
                              "versions": _versions(), "cores": os.cpu_count()}
    try:
        import PIL  # noqa: F401
    except ImportError:
        result["rows"] = [asdict(ImageRow(name, set=s.name, status="not installed (Pillow)"))
                          for s in sets for name in JPEG_ROWS]
        return result
    before = set(children(os.getpid()))
    work_dir = tempfile.mkdtemp(prefix="batchfeed-bench-jpeg-")
    rows: list[ImageRow] = []
    try:
        for spec in sets:
            progress(f"jpeg: writing {spec.images:,} {spec.image_size}x{spec.image_size} JPEGs")
            directory = os.path.join(work_dir, spec.name)
            result["sets"][spec.name] = write_image_set(spec, directory, options.seed)
            more, result["baseline"] = set_rows(spec, directory, options, work_dir, progress,
                                                result["problems"])
            rows += more
            shutil.rmtree(directory, ignore_errors=True)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    result["problems"] += _leftovers(before)
    result["rows"] = [asdict(r) for r in rows]
    result["goals"] = goals(rows, sets)
    result["elapsed_s"] = time.perf_counter() - started
    return result


def failures(result: dict[str, Any]) -> list[str]:
    """The section's failed rows and problems (for ``run.failures``)."""
    failed = [f"jpeg {r['set']}: {r['name']}" for r in result.get("rows", [])
              if r["status"].startswith("failed")]
    return failed + [f"jpeg: {p}" for p in result.get("problems", [])]


# ---------------------------------------------------------------------------------------------
# Printing

LEGEND = """\
  images/s: images delivered into this process (decoded, cropped, flipped, normalised float32
    CHW, with their labels), in the best of the rounds (rounds: each round's images/s; the
    rows take turns, round after round).  vs torch: over torch's DataLoader with as many worker
    processes (the two-server row: 2 workers); vs 1 worker: the 2-worker rows over the same
    loader's 1-worker row (batchfeed's: the fast path's).  first batch ms: batchfeed: Client()
    to the first batch, the server already up (server start s: its start, the folder read
    into shared memory); torch: iter(DataLoader) to the first batch (its workers forked).
  CPU, in cores (CPU seconds per second of the window): client: this process (all threads);
    loader: the servers (front ends and workers) or the DataLoader's workers; other: the rest
    of the machine's busy time (/proc/stat, steal included): other jobs on this host.  loader
    CPU ms/image: the loader's CPU per image delivered.
  This machine has {cores} cores, shared by the consuming process, the servers' front ends,
    every worker and whatever else runs on it: a row's workers get at most {cores} - client -
    other cores, so 2 workers reach 2x 1 worker only while nothing else takes CPU."""

COLUMNS = ["row", "images/s", "rounds", "vs torch", "vs 1 worker", "first batch ms",
           "client CPU", "loader CPU", "other CPU", "loader CPU ms/image", "server start s"]


def format_jpeg(result: dict[str, Any], options: BenchOptions) -> list[str]:
    if not result["sets"]:
        return ["jpeg: " + "; ".join(sorted({r["status"] for r in result["rows"]}))]
    versions = ", ".join(f"{k} {v}" for k, v in result["versions"].items())
    lines = [f"jpeg: decode + random-resized-crop + flip + normalise to float32 CHW, from "
             f"folders of JPEGs (quality {QUALITY}, 10 classes); {result['seconds']:g} s per "
             f"row after {result['warmup_s']:g} s warm-up, best of {result['rounds']} "
             f"round{'' if result['rounds'] == 1 else 's'}; installed: {versions}"]
    for name, described in result["sets"].items():
        lines += ["", f"  {described['description']} ({described['mean_bytes'] / 1e3:.1f} kB "
                      f"and {described['bits_per_pixel']:.1f} bits/pixel on average; written "
                      f"in {described['write_s']:.0f} s)"]
        cells = []
        for r in (ImageRow(**row) for row in result["rows"] if row["set"] == name):
            cells.append((r.name, r.status, [
                fmt(r.images_per_s, ",.0f"),
                " / ".join(f"{rate:,.0f}" for rate in r.runs_images_per_s),
                fmt(r.vs_torch, ".2f"), fmt(r.vs_one_worker, ".2f"),
                fmt(r.first_batch_ms, ",.0f"), fmt(r.client_cpu_cores, ".2f"),
                fmt(r.loader_cpu_cores, ".2f"), fmt(r.other_cpu_cores, ".2f"),
                fmt(r.loader_cpu_ms_per_image, ".3f"), fmt(r.server_start_s, ".1f")]))
        lines += text_table(COLUMNS, cells)
        lines += _two_server_lines(result["rows"], name, result["cores"])
    lines += ["", "  batchfeed: --transform \"batchfeed.transforms:train_images(size=S)\" in "
                  "the servers' workers (decoder and resizer as batchfeed.images picks them "
                  "from what is installed), --slot-mb as one batch needs; the client on the "
                  "fast path (ipc://, what a trainer on the server's host uses) but in the tcp "
                  "row.",
              f"  torch: DataLoader(batch_size as above, shuffle=True, num_workers=N, "
              f"persistent_workers=True), default collate; {result['baseline']}."]
    lines += ["  goals:"] + [f"    {goal_line(g)}" for g in result["goals"]]
    lines += [f"  problem: {p}" for p in result["problems"]]
    return lines + [LEGEND.format(cores=result["cores"])]


def _two_server_lines(rows: list[dict[str, Any]], name: str, cores: int) -> list[str]:
    by_name = {r["name"]: r for r in rows if r["set"] == name and r["status"] == "ok"}
    two, one = by_name.get(ROW_TWO_SERVERS), by_name.get(_plural(ROW_BATCHFEED, 1))
    if two is None or one is None:
        return []
    both = by_name.get(_plural(ROW_BATCHFEED, 2))
    beside = (f" (one server with 2 workers: {both['images_per_s'] / one['images_per_s']:.2f}x)"
              if both else "")
    return [f"  two servers of 1 worker sharing one job: "
            f"{two['images_per_s'] / one['images_per_s']:.2f}x one server of 1 worker{beside}. "
            f"Here both servers run on the same {cores} cores as the client, so this can show at "
            f"most ~{min(cores, 2)}x (less the front ends' and the client's share); on separate "
            "hosts each server brings its own cores, and one job's decode scales with the "
            "number of loader hosts until the trainer's network (a float32 224x224 image is "
            "602 kB: ~2,000 images/s fill 10 Gb/s) or its client CPU is the limit."]
