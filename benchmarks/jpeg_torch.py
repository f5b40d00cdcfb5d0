"""torch's side of the JPEG section: torchvision's ``ImageFolder`` with its training transforms
if torchvision imports, else the same thing written out (``FolderImages`` and ``TrainAugment``:
Pillow's full decode, then torchvision's code path line for line); and the DataLoader that reads
it, epoch after epoch, its workers shut down on exit."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from .inprocess import shutdown_loader
from .measure import epochs_of

LOADER_TIMEOUT = 120.0  # a DataLoader worker's batch, on a loaded 2-core machine
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TORCHVISION_HINT = ("torchvision does not import here (pip install torchvision, the build "
                    "matching torch); its ImageFolder and transforms are written out instead")


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
                "out line for line (benchmarks.jpeg_torch.FolderImages, TrainAugment)")
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

    def pids() -> list[int]:
        iterator = getattr(loader, "_iterator", None)
        return [w.pid for w in getattr(iterator, "_workers", [])]

    batches = epochs_of(loader)
    try:
        yield batches, pids
    finally:
        batches.close()
        shutdown_loader(loader)
