"""Framework adapters: turn a batch of numpy views into torch tensors or jax arrays.

Frameworks are imported only when an adapter is first used.  ``format="jax"`` places each
array with ``jax.device_put`` (a copy into JAX's buffers; int64 becomes int32 unless JAX's
``jax_enable_x64`` is on).  ``torch`` tensors share memory
with the received buffers (``torch.from_numpy``), so no byte is copied unless ``pin_memory`` or
``device`` asks for it.  Fields torch cannot represent (fixed-width strings) stay numpy arrays.

On the same-host fast path, batches live in the server's read-only shared memory: numpy refuses
in-place writes to them, but torch cannot mark a tensor read-only, so an in-place op on such a
tensor would crash.  ``format="torch"`` therefore copies read-only fields (and only those) unless
``zero_copy_readonly=True`` says the training loop never writes to its inputs.

Converted batches are ``FieldBatch`` dicts, as numpy ones are: a wrong field name raises a
KeyError that names the fields the batch has.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from batchfeed.shared.errors import InvalidArgument
from batchfeed.shared.protocol import FieldBatch

FORMATS = ("numpy", "torch", "jax")

Convert = Callable[[dict[str, np.ndarray]], FieldBatch]


def converter(format: str, *, pin_memory: bool = False, device: Any = None,
              zero_copy_readonly: bool = False) -> Convert | None:
    """The per-batch conversion for ``format`` (None for numpy: batches pass through)."""
    if format not in FORMATS:
        raise InvalidArgument(
            f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}")
    if format == "numpy":
        if pin_memory or device is not None:
            raise InvalidArgument("pin_memory and device need format='torch' or 'jax'")
        return None
    if format == "torch":
        return _torch_converter(pin_memory, device, zero_copy_readonly)
    if pin_memory:
        raise InvalidArgument("pin_memory is a torch option; jax places arrays with device=")
    return _jax_converter(device)


def _torch_converter(pin_memory: bool, device: Any,
                     zero_copy_readonly: bool) -> Convert:
    try:
        import torch
    except ImportError:
        raise InvalidArgument(
            "format='torch' needs PyTorch: pip install 'batchfeed[torch]'") from None
    if pin_memory and not torch.cuda.is_available():
        warnings.warn("pin_memory=True has no effect without CUDA; ignoring it", stacklevel=3)
        pin_memory = False
    target = torch.device(device) if device is not None else None

    def convert(batch: dict[str, np.ndarray]) -> FieldBatch:
        out = FieldBatch()
        for name, arr in batch.items():
            if not isinstance(arr, np.ndarray) or arr.dtype.kind in "SU":
                out[name] = _texts(arr)  # strings and bytes: lists, which torch has no tensor of
                continue
            if not arr.dtype.isnative:
                arr = arr.astype(arr.dtype.newbyteorder("="))
            elif not arr.flags.writeable and not zero_copy_readonly:
                arr = arr.copy()
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                tensor = torch.from_numpy(arr)
            if pin_memory:
                tensor = tensor.pin_memory()
            if target is not None:
                tensor = tensor.to(target, non_blocking=pin_memory)
            out[name] = tensor
        return out

    return convert


def _texts(value: Any) -> list:
    """A batch's strings (or bytes) as a list: fixed-width numpy strings included."""
    return value.tolist() if isinstance(value, np.ndarray) else value


def _jax_converter(device: Any) -> Convert:
    try:
        import jax
    except ImportError:
        raise InvalidArgument("format='jax' needs JAX: pip install jax") from None

    def convert(batch: dict[str, np.ndarray]) -> FieldBatch:
        return FieldBatch((name, _texts(arr) if not isinstance(arr, np.ndarray)
                           or arr.dtype.kind in "SU" else jax.device_put(arr, device))
                          for name, arr in batch.items())

    return convert
