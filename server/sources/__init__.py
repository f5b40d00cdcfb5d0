"""Where datasets come from.  ``inspect_source(path)`` finds the reader for a path and returns
its fields (from headers and metadata only); each reader lives in its own module:

- ``npfiles``: ``.npz``, ``.npy``, a directory of ``.npy`` files;
- ``arrow``: Parquet (a file or a directory), Arrow IPC (``.arrow``, ``.feather``), a Hugging
  Face ``save_to_disk`` directory (pyarrow, an optional extra);
- ``image_folder``: a folder of images in torchvision's ImageFolder layout;
- ``synthetic``: the built-in default;
- ``memory``: columns already in memory, for ``batchfeed.serve(...)``.
"""

from __future__ import annotations

from pathlib import Path

from batchfeed.shared.errors import DatasetError

from .base import FieldSource, check_fields, default_names
from .synthetic import SYNTHETIC_NAME, synthetic_arrays, synthetic_sources

__all__ = ["SYNTHETIC_NAME", "FieldSource", "check_fields", "default_names", "inspect_source",
           "synthetic_arrays", "synthetic_sources"]

HINT = ("--data takes a .npz or .npy file, a directory of .npy files, a Parquet file or "
        "directory, an Arrow IPC file (.arrow, .feather), a Hugging Face save_to_disk "
        "directory, or an image folder (DIR/<class>/<image>.jpg|png)")


def inspect_source(path: str) -> list[FieldSource]:
    """The fields of the data at ``path``, read from headers and metadata only."""
    from . import arrow, image_folder, npfiles

    p = Path(path)
    if not p.exists():
        raise DatasetError(f"no such file or directory: {path}; {HINT}")
    if p.is_dir():
        suffixes = {f.suffix for f in p.iterdir()}
        if arrow.is_hf_dir(p):
            sources = arrow.hf_sources(p)
        elif ".parquet" in suffixes:
            sources = arrow.parquet_sources(p)
        elif ".npy" in suffixes:
            sources = npfiles.npy_dir_sources(p)
        elif image_folder.is_image_folder(p):
            sources = image_folder.image_folder_sources(p)
        else:
            raise DatasetError(f"directory {path} holds no data batchfeed can serve; {HINT}")
    elif p.suffix == ".npz":
        sources = npfiles.npz_sources(p)
    elif p.suffix == ".npy":
        sources = [npfiles.npy_source(p, p.stem)]
    elif p.suffix == ".parquet":
        sources = arrow.parquet_sources(p)
    elif p.suffix in arrow.IPC_SUFFIXES:
        sources = arrow.ipc_sources(p)
    else:
        raise DatasetError(f"{path} is not a kind of file batchfeed can serve; {HINT}")
    check_fields(sources, path)
    return sources
