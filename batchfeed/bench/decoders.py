"""Which JPEG/PNG decoder the image workers should use, measured on this machine.

For each decoder that imports (Pillow or Pillow-SIMD, simplejpeg, PyTurboJPEG,
opencv-python-headless; the others are listed as skipped, with the reason) and each workload
(JPEG quality 90 at 64x64, 256x256 and 500x375, PNG at 64x64 and 256x256), it measures images
per second on one core (the process is pinned to one CPU, and by default the time counted is
its CPU time, so that other work on a shared machine does not count) of:

- ``decode``: the encoded bytes to an RGB uint8 HWC numpy array, the conversion counted;
- ``crop 224`` and ``crop 32``: decode, then a RandomResizedCrop (torchvision's box sampling:
  area 8-100 %, aspect 3/4-4/3) to a 224x224 or 32x32 RGB uint8 HWC array, by each library's
  fastest correct path: a JPEG is decoded at 1/2, 1/4 or 1/8 scale when the crop is still at
  least the target's size at that scale (Pillow ``Image.draft``, simplejpeg ``min_height`` /
  ``min_width``, PyTurboJPEG ``scaling_factor``, OpenCV ``IMREAD_REDUCED_*``), then resized
  (Pillow ``resize(box=...)`` bilinear, antialiased; or ``cv2.resize``, INTER_AREA when it
  shrinks, INTER_LINEAR when it enlarges).  The ``pillow`` row decodes at full size and resizes
  with Pillow, as torchvision does on PIL images: it is the baseline of the speed-ups.

The images are synthetic but photo-like: 1/f noise with correlated colour, a gradient,
hard-edged textured shapes and sensor grain (about 4-6 bits per pixel at quality 90, as
photos have).
Every decoder gets the same bytes and the same crop boxes.  A run decodes ``--images`` images
(cycling over 100 distinct ones); the rows take turns run by run and each figure is the median
of ``--repeats`` runs.  ``err`` is the mean absolute difference (0-255 levels; the worst
workload) of a path's outputs from exact ones: a full decode by the first library listed, then
the path's own resizer on the exact box: what the shortcuts cost (decoding at 1/k; OpenCV's
whole-pixel boxes at 1/k), so a path that cuts a corner shows.  The GIL column says whether
another Python thread runs while the library decodes a 2000x1500 JPEG (it needs a second CPU).
Nothing here starts a process; the GIL probe's one thread is stopped and joined in ``finally``.

Run ``python3 -m batchfeed.bench.decoders``, or this file by path in a venv that has only numpy
and decoders: it needs only the standard library and numpy, and imports each decoder lazily.
Pillow (or Pillow-SIMD) is needed to encode the workload; ``--workload FILE`` saves it, or loads
it when FILE exists, so that Pillow and Pillow-SIMD, which replace one another and so live in
different environments, decode the same bytes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import io
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

QUALITY = 90
DISTINCT_IMAGES = 100
CROP_TARGETS = (224, 32)
REDUCTIONS = (8, 4, 2, 1)  # JPEG DCT scalings every decoder here offers, largest first


@dataclass(frozen=True)
class Workload:
    """One kind of encoded image: format, size, and the bytes of ``DISTINCT_IMAGES`` images."""

    fmt: str  # "jpeg" or "png"
    height: int
    width: int
    blobs: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return f"{self.fmt} {self.width}x{self.height}"

    @property
    def bits_per_pixel(self) -> float:
        return 8 * statistics.mean(map(len, self.blobs)) / (self.height * self.width)


WORKLOAD_SHAPES = (("jpeg", 64, 64), ("jpeg", 256, 256), ("jpeg", 375, 500),
                   ("png", 64, 64), ("png", 256, 256))


@dataclass(frozen=True)
class CropBox:
    """A RandomResizedCrop box in source pixels."""

    top: int
    left: int
    height: int
    width: int

    def scaled(self, k: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) in the pixels of the image decoded at 1/k scale."""
        return (self.left / k, self.top / k, (self.left + self.width) / k,
                (self.top + self.height) / k)


@dataclass(frozen=True)
class DecoderPath:
    """One way to decode (and crop): a row of the tables.

    ``crop(data, box, size)`` returns the ``size`` x ``size`` RGB uint8 HWC crop;
    ``decode(data)`` the full RGB uint8 HWC array, or is ``None`` when another row of the same
    library already measures decoding (the tables show it once per library).
    """

    name: str
    library: str  # the distribution the row measures, for the facts table
    formats: frozenset[str]
    resize: str  # what resizes the crop
    decode: Callable[[bytes], np.ndarray] | None
    crop: Callable[[bytes, CropBox, int], np.ndarray]


# ---------------------------------------------------------------- the workload


def synthetic_image(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """A photo-like RGB uint8 image: 1/f noise, a gradient, textured shapes with hard edges."""

    def pink() -> np.ndarray:  # amplitude ~ 1/f, the spectrum of natural images
        fy = np.fft.fftfreq(height)[:, None]
        fx = np.fft.rfftfreq(width)[None, :]
        f = np.hypot(fy, fx)
        f[0, 0] = 1.0
        spec = rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)
        field = np.fft.irfft2(spec / f, s=(height, width))
        return (field - field.mean()) / (field.std() + 1e-9)

    mix = np.array([[1.0, 1.0, 1.0], [0.35, 0.0, -0.35], [-0.2, 0.4, -0.2]])  # luma, 2 chroma
    img = np.einsum("khw,kc->hwc", np.stack([pink() for _ in range(3)]), mix * [[40], [20], [20]])
    img += rng.uniform(60, 190, size=3)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * cols + np.sin(angle) * rows) / max(height, width)
    img += 50 * ramp[..., None] - 25
    for _ in range(int(rng.integers(3, 9))):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        ry, rx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        if rng.random() < 0.5:  # a rectangle
            mask = (np.abs(rows - cy) < ry) & (np.abs(cols - cx) < rx)
        else:  # an ellipse
            mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 < 1
        colour = rng.uniform(0, 255, size=3)
        img[mask] = 0.6 * colour + 0.4 * img[mask]
    img += rng.normal(0, 2.5, size=img.shape)  # sensor grain
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_workload(fmt: str, height: int, width: int, seed: int = 0) -> Workload:
    """``DISTINCT_IMAGES`` synthetic images encoded by Pillow (JPEG quality 90, 4:2:0; PNG)."""
    from PIL import Image

    rng = np.random.default_rng([seed, height, width, fmt == "png"])
    blobs = []
    for _ in range(DISTINCT_IMAGES):
        out = io.BytesIO()
        im = Image.fromarray(synthetic_image(height, width, rng))
        if fmt == "jpeg":
            im.save(out, "JPEG", quality=QUALITY)
        else:
            im.save(out, "PNG")
        blobs.append(out.getvalue())
    return Workload(fmt, height, width, tuple(blobs))


def save_workloads(workloads: Sequence[Workload], path: Path) -> None:
    arrays: dict[str, Any] = {}
    for i, w in enumerate(workloads):
        arrays[f"{i}_bytes"] = np.frombuffer(b"".join(w.blobs), np.uint8)
        arrays[f"{i}_sizes"] = np.array([len(b) for b in w.blobs], np.int64)
        arrays[f"{i}_meta"] = np.array([w.fmt == "png", w.height, w.width], np.int64)
    np.savez(path, **arrays)


def load_workloads(path: Path) -> list[Workload]:
    with np.load(path) as z:
        out = []
        for i in range(len(z.files) // 3):
            data, sizes = z[f"{i}_bytes"].tobytes(), z[f"{i}_sizes"]
            png, height, width = (int(v) for v in z[f"{i}_meta"])
            ends = np.cumsum(sizes)
            blobs = tuple(data[e - s:e] for s, e in zip(sizes.tolist(), ends.tolist()))
            out.append(Workload("png" if png else "jpeg", height, width, blobs))
    return out


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator) -> CropBox:
    """torchvision ``RandomResizedCrop.get_params`` with scale (0.08, 1), ratio (3/4, 4/3)."""
    area = height * width
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return CropBox(int(rng.integers(0, height - h + 1)),
                           int(rng.integers(0, width - w + 1)), h, w)
    ratio = width / height  # fall back to a central crop, as torchvision does
    if ratio < 3 / 4:
        w, h = width, round(width / (3 / 4))
    elif ratio > 4 / 3:
        w, h = round(height * 4 / 3), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w)


def reduction(box: CropBox, size: int) -> int:
    """The largest JPEG scale-down 1/k after which the crop still has at least ``size`` pixels
    on each side, so the resize that follows never upsamples what a full decode would not
    (1 when the crop is already smaller than the target)."""
    return next((k for k in REDUCTIONS if box.height / k >= size and box.width / k >= size), 1)


# ---------------------------------------------------------------- the decoders, lazily


def _pillow_paths() -> list[DecoderPath]:
    from PIL import Image

    def decode(data: bytes) -> np.ndarray:
        im = Image.open(io.BytesIO(data))
        return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))

    def crop_with(draft: bool) -> Callable[[bytes, CropBox, int], np.ndarray]:
        def crop(data: bytes, box: CropBox, size: int) -> np.ndarray:
            im: Image.Image = Image.open(io.BytesIO(data))
            k = 1
            if draft and im.format == "JPEG" and reduction(box, size) > 1:
                full_w, full_h = im.size
                k = reduction(box, size)
                im.draft("RGB", (full_w // k, full_h // k))
                k = round(full_w / im.size[0])  # the scale libjpeg gave
            if im.mode != "RGB":
                im = im.convert("RGB")
            return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR,
                                        box=box.scaled(k)))
        return crop

    library = _pillow_distribution()
    jpeg_png = frozenset({"jpeg", "png"})
    return [DecoderPath(library, library, jpeg_png, "PIL", decode, crop_with(draft=False)),
            DecoderPath(f"{library}+draft", library, frozenset({"jpeg"}), "PIL", None,
                        crop_with(draft=True))]


def _pillow_distribution() -> str:
    try:
        importlib.metadata.version("pillow-simd")
        return "pillow-simd"
    except importlib.metadata.PackageNotFoundError:
        return "pillow"


def _resizers() -> dict[str, Callable[[np.ndarray, CropBox, int, int], np.ndarray]]:
    """Crop-and-resize of an array decoded at 1/k scale, by every library that can."""
    out: dict[str, Callable[[np.ndarray, CropBox, int, int], np.ndarray]] = {}
    try:
        import cv2  # noqa: F401  (imported again, from the cache, where it is used)
    except ImportError:
        pass
    else:
        out["cv2"] = _cv2_crop_resize
    try:
        from PIL import Image
    except ImportError:
        pass
    else:
        def pil_resize(arr: np.ndarray, box: CropBox, k: int, size: int) -> np.ndarray:
            im = Image.fromarray(arr)
            return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR,
                                        box=box.scaled(k)))
        out["PIL"] = pil_resize
    return out


def _cv2_crop_resize(arr: np.ndarray, box: CropBox, k: int, size: int) -> np.ndarray:
    """Crop (to whole pixels of the 1/k image) and resize: INTER_AREA, which averages, when
    both sides shrink; INTER_LINEAR otherwise (INTER_AREA enlarges like INTER_NEAREST)."""
    import cv2

    left, top, right, bottom = (round(v) for v in box.scaled(k))
    region = arr[top:max(bottom, top + 1), left:max(right, left + 1)]
    shrinks = region.shape[0] >= size and region.shape[1] >= size
    return cv2.resize(region, (size, size),
                      interpolation=cv2.INTER_AREA if shrinks else cv2.INTER_LINEAR)


def _simplejpeg_paths() -> list[DecoderPath]:
    import simplejpeg

    def decode(data: bytes) -> np.ndarray:
        return simplejpeg.decode_jpeg(data, colorspace="RGB")

    def crop_with(resize: Callable) -> Callable[[bytes, CropBox, int], np.ndarray]:
        def crop(data: bytes, box: CropBox, size: int) -> np.ndarray:
            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            k = reduction(box, size)  # asking for ceil(side / k) gets exactly the 1/k scale
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-height // k),
                                         min_width=-(-width // k))
            return resize(arr, box, k, size)
        return crop

    return _numpy_decoder_paths("simplejpeg", decode, crop_with)


def _turbojpeg_paths() -> list[DecoderPath]:
    from turbojpeg import TJPF_RGB, TurboJPEG

    jpeg = TurboJPEG()  # finds libturbojpeg.so; raises if the system library is missing

    def decode(data: bytes) -> np.ndarray:
        return jpeg.decode(data, pixel_format=TJPF_RGB)

    def crop_with(resize: Callable) -> Callable[[bytes, CropBox, int], np.ndarray]:
        def crop(data: bytes, box: CropBox, size: int) -> np.ndarray:
            k = reduction(box, size)
            arr = jpeg.decode(data, pixel_format=TJPF_RGB, scaling_factor=(1, k))
            return resize(arr, box, k, size)
        return crop

    return _numpy_decoder_paths("pyturbojpeg", decode, crop_with)


def _numpy_decoder_paths(library: str, decode: Callable[[bytes], np.ndarray],
                         crop_with: Callable[[Callable], Callable]) -> list[DecoderPath]:
    """One row per resizer; the first also carries the library's decode-only figure."""
    resizers = _resizers()
    if not resizers:
        raise ImportError("neither cv2 nor PIL is importable to resize its crops")
    return [DecoderPath(f"{library}+{name}", library, frozenset({"jpeg"}), name,
                        decode if i == 0 else None, crop_with(fn))
            for i, (name, fn) in enumerate(resizers.items())]


def _opencv_paths() -> list[DecoderPath]:
    import cv2

    cv2.setNumThreads(1)  # one core per worker process; OpenCV would otherwise start a pool
    reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
               8: cv2.IMREAD_REDUCED_GRAYSCALE_8}  # | IMREAD_COLOR_RGB: reduced, in colour

    def imdecode(data: bytes, flags: int) -> np.ndarray:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
        if arr is None:
            raise ValueError("OpenCV could not decode the image")
        return np.asarray(arr)

    def decode(data: bytes) -> np.ndarray:
        return imdecode(data, cv2.IMREAD_COLOR_RGB)

    def crop(data: bytes, box: CropBox, size: int) -> np.ndarray:
        k = reduction(box, size) if data[:2] == b"\xff\xd8" else 1  # PNG has no cheap scaling
        return _cv2_crop_resize(imdecode(data, reduced[k] | cv2.IMREAD_COLOR_RGB), box, k, size)

    return [DecoderPath("opencv", "opencv-python-headless", frozenset({"jpeg", "png"}), "cv2",
                        decode, crop)]


LIBRARIES: dict[str, Callable[[], list[DecoderPath]]] = {
    "pillow": _pillow_paths,
    "simplejpeg": _simplejpeg_paths,
    "pyturbojpeg": _turbojpeg_paths,
    "opencv-python-headless": _opencv_paths,
}


def available_paths() -> tuple[list[DecoderPath], dict[str, str]]:
    """The rows of every library that imports, and why each other library was skipped."""
    paths: list[DecoderPath] = []
    skipped: dict[str, str] = {}
    for name, make in LIBRARIES.items():
        try:
            paths.extend(make())
        except Exception as exc:  # ImportError, or a missing system library (OSError...)
            skipped[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return paths, skipped


# ---------------------------------------------------------------- measuring


@dataclass(frozen=True)
class Task:
    """What one cell of a table times: a path on a workload, decode only or a crop."""

    path: DecoderPath
    workload: Workload
    target: int | None  # None: decode only

    def calls(self, count: int, seed: int = 1) -> list[tuple]:
        rng = np.random.default_rng(seed)  # the same boxes for every path
        w = self.workload
        items: list[tuple] = []
        for i in range(count):
            data = w.blobs[i % len(w.blobs)]
            if self.target is None:
                items.append((data,))
            else:
                items.append((data, random_resized_crop_box(w.height, w.width, rng),
                              self.target))
        return items

    @property
    def fn(self) -> Callable:
        fn = self.path.decode if self.target is None else self.path.crop
        assert fn is not None
        return fn


# "cpu" counts the CPU time of this process only: on a shared machine, time spent waiting for
# the CPU while others run is left out, so it is the cost on one core that is measured.
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def images_per_second(fn: Callable, calls: Sequence[tuple],
                      clock: Callable[[], float] = time.process_time) -> float:
    start = clock()
    for args in calls:
        fn(*args)
    return len(calls) / (clock() - start)


def measure(tasks: Sequence[Task], images: int, repeats: int,
            clock: Callable[[], float] = time.process_time) -> dict[Task, list[float]]:
    """The images/s of every run of each task; the tasks take turns, run by run, so that a
    slow spell of the machine falls on all of them alike."""
    calls = {t: t.calls(images) for t in tasks}
    for t in tasks:  # warm up: first-call imports, caches, lazily built tables
        images_per_second(t.fn, calls[t][:20], clock)
    rates: dict[Task, list[float]] = {t: [] for t in tasks}
    for _ in range(repeats):
        for t in tasks:
            rates[t].append(images_per_second(t.fn, calls[t], clock))
    return rates


def crop_error(task: Task, reference: Callable[[bytes], np.ndarray], samples: int = 30) -> float:
    """Mean |difference| (0-255 levels) of ``samples`` outputs from the exact ones: the
    ``reference`` full decode, then (for a crop) the path's own resizer at full scale.  So it
    is what the path's shortcuts cost (decoding at 1/k, whole-pixel boxes), not the choice of
    filter: OpenCV's INTER_AREA and Pillow's bilinear differ by ~1-2 levels at 32x32."""
    diffs = []
    resizers = _resizers()
    for args in task.calls(samples):
        got = task.fn(*args).astype(np.int16)
        want = reference(args[0])
        if task.target is not None:
            want = resizers[task.path.resize](want, args[1], 1, task.target)
        assert got.shape == want.shape, f"{task.path.name}: shape {got.shape} != {want.shape}"
        diffs.append(float(np.abs(got - want).mean()))
    return statistics.mean(diffs)


def gil_release_share(fn: Callable, calls: Sequence[tuple]) -> float:
    """The share of ``fn`` calls during which another Python thread ran: ~1 if ``fn`` releases
    the GIL while it decodes, ~0 if it holds it.  Needs a second CPU for that thread.

    Each call should take ~20 ms: the other thread takes a few milliseconds to wake on a busy
    machine.  A 100 ms switch interval keeps the interpreter from handing the GIL over by
    itself in the middle of most calls, which would look like a release."""
    progress = [0]
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            progress[0] += 1

    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.1)
    spinner = threading.Thread(target=spin, name="gil-probe", daemon=True)
    spinner.start()
    try:
        ran = 0
        for args in calls:
            before = progress[0]
            fn(*args)
            ran += progress[0] > before
    finally:
        stop.set()
        spinner.join(timeout=10)
        sys.setswitchinterval(interval)
    return ran / len(calls)


def install_facts(distribution: str) -> dict[str, str]:
    """Version, wheel tag (manylinux: no compiler needed), license and installed size."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return {}
    wheel = dist.read_text("WHEEL") or ""
    tags = [line.split(":", 1)[1].strip() for line in wheel.splitlines()
            if line.startswith("Tag:")]
    meta = dist.metadata
    license_ = (meta.get_all("License-Expression") or meta.get_all("License") or [""])[0]
    license_lines = license_.splitlines()
    size = sum(f.size or 0 for f in dist.files or [])
    return {"version": dist.version, "wheel": tags[0] if tags else "?",
            "license": license_lines[0][:30] if license_lines else "?",
            "size": f"{size / 2**20:.2f} MB"}


# ---------------------------------------------------------------- the report


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:  # the first column left-aligned, numbers right
        return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([title, line(header), line(["-" * w for w in widths]),
                      *map(line, rows), ""])


def report(paths: Sequence[DecoderPath], workloads: Sequence[Workload],
           rates: dict[Task, float], errors: dict[Task, float]) -> str:
    by_key = {(t.path.name, t.workload.name, t.target): (r, errors.get(t))
              for t, r in rates.items()}
    names = [w.name for w in workloads]
    base = paths[0].name  # the full-size Pillow row, when Pillow is there
    out = []
    for target in (None, *CROP_TARGETS):
        rows = []
        for p in paths:
            cells, worst = [], 0.0
            for w in workloads:
                got = by_key.get((p.name, w.name, target))
                if got is None:
                    cells.append("-")
                    continue
                rate, err = got
                worst = max(worst, err or 0.0)
                ref = by_key.get((base, w.name, target))
                cells.append(f"{rate:,.0f}" + (f" x{rate / ref[0]:.2f}" if ref else ""))
            if any(c != "-" for c in cells):
                label = p.library if target is None else p.name
                rows.append([label, p.resize if target else "", *cells, f"{worst:.2f}"])
        what = f"decode + RandomResizedCrop to {target}x{target}" if target else "decode only"
        out.append(_table(f"{what}: images/s on one core (x speed-up over '{base}')",
                          ["path", "resize", *names, "err"], rows))
    return "\n".join(out)


def facts_table(paths: Sequence[DecoderPath], workloads: Sequence[Workload],
                gil: dict[str, float]) -> str:
    rows = []
    for library in dict.fromkeys(p.library for p in paths):
        f = install_facts(library)
        rows.append([library, f.get("version", "?"), f.get("wheel", "?"), f.get("size", "?"),
                     f.get("license", "?"), _gil_cell(gil.get(library))])
    sizes = ", ".join(f"{w.name} {w.bits_per_pixel:.1f} bpp" for w in workloads)
    return _table(f"installed (workload: {sizes})",
                  ["library", "version", "wheel tag", "installed", "license",
                   "releases GIL"], rows)


def _gil_cell(share: float | None) -> str:
    if share is None:
        return "-"
    return f"{'yes' if share > 0.5 else 'no'} ({share:.0%} of calls)"


def run(images: int, repeats: int, workload_file: Path | None, cpu: int | None,
        gil: bool, json_out: Path | None, clock: str = "cpu") -> str:
    """Measure every available path on every workload and return the report text."""
    paths, skipped = available_paths()
    if not paths:
        raise SystemExit("no decoder is importable:\n" + "\n".join(
            f"  {name}: {why}" for name, why in skipped.items()))
    workloads = _workloads(workload_file)
    tasks = [Task(p, w, target) for w in workloads for p in paths if w.fmt in p.formats
             for target in (None, *CROP_TARGETS)
             if (p.decode if target is None else p.crop) is not None]
    reference = paths[0]  # the first library that imports decodes the exact outputs
    assert reference.decode is not None
    errors = {t: crop_error(t, reference.decode) for t in tasks
              if t.workload.fmt in reference.formats}
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu if cpu is not None else min(allowed)})
    try:
        runs = measure(tasks, images, repeats, CLOCKS[clock])
    finally:
        os.sched_setaffinity(0, allowed)
    rates = {t: statistics.median(r) for t, r in runs.items()}
    gil_shares = _gil_shares(paths) if gil and len(allowed) > 1 else {}
    text = "\n".join([report(paths, workloads, rates, errors),
                      facts_table(paths, workloads, gil_shares),
                      *(f"skipped {n}: {why}" for n, why in skipped.items()),
                      f"python {sys.version.split()[0]}, numpy {np.__version__}, "
                      f"{images} images per run, median of {repeats} runs, {clock} clock"])
    if json_out is not None:
        json_out.write_text(json.dumps(
            [{"path": t.path.name, "library": t.path.library, "resize": t.path.resize,
              "workload": t.workload.name, "target": t.target, "images_per_s": rates[t],
              "runs": r, "err": errors.get(t), "clock": clock} for t, r in runs.items()],
            indent=1))
    return text


def _workloads(path: Path | None) -> list[Workload]:
    if path is not None and path.exists():
        return load_workloads(path)
    if importlib.util.find_spec("PIL") is None:
        raise SystemExit("Pillow is needed to encode the workload: install it, or pass "
                         "--workload FILE saved by a run in an environment that has it")
    workloads = [encode_workload(*shape) for shape in WORKLOAD_SHAPES]
    if path is not None:
        save_workloads(workloads, path)
    return workloads


def _gil_shares(paths: Sequence[DecoderPath]) -> dict[str, float]:
    """Each library's ``gil_release_share`` on 20 decodes of a 2000x1500 JPEG (none without
    Pillow to encode it)."""
    if importlib.util.find_spec("PIL") is None:
        return {}
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(synthetic_image(1500, 2000, np.random.default_rng(0))).save(
        out, "JPEG", quality=QUALITY)
    calls = [(out.getvalue(),)] * 20
    return {p.library: gil_release_share(p.decode, calls)
            for p in paths if p.decode is not None}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m batchfeed.bench.decoders",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000, help="images per run")
    parser.add_argument("--repeats", type=int, default=5, help="runs per cell; median")
    parser.add_argument("--workload", type=Path, help="save the workload here, or load it")
    parser.add_argument("--cpu", type=int, help="the CPU to pin to (default: the first)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: this process's CPU time (default; robust on a busy "
                             "machine); wall: elapsed time")
    parser.add_argument("--no-gil", action="store_true", help="skip the GIL check")
    parser.add_argument("--json", type=Path, help="also write the rates here")
    args = parser.parse_args(argv)
    if args.images < 20 or args.repeats < 1:
        parser.error("--images must be >= 20 and --repeats >= 1")
    print(run(args.images, args.repeats, args.workload, args.cpu, not args.no_gil, args.json,
              args.clock))


if __name__ == "__main__":
    main()
