"""Server-side transforms: ``fn(batch, rng) -> batch``, run by the workers on every batch.

``batchfeed serve --transform package.module:function`` imports the function once, in the main
process before the workers are forked, so a wrong name fails at start;
``package.module:factory(size=224)`` calls a factory with literal arguments for a configured
transform (``batchfeed.transforms:train_images(size=224)``).  Workers call it with a
dict of freshly gathered arrays (the transform may modify them) and a ``numpy.random.Generator``
seeded from (seed, epoch, global batch number): the output is as deterministic as the plan.

Ragged fields (variable-length rows, strings, bytes) come in as ``Ragged(values, offsets)`` with
offsets from 0, and a transform may return ``Ragged`` values too (a tokenizer turning strings
into token ids); they are then served as the session asked (padded, or flat).  The output may
change dtypes and shapes (crops, normalisation, padding tokens to the batch's longest
sequence).  A transform may declare what it returns with an ``output_schema``
attribute, ``{"x": ("float32", (3, 28, 28)), "label": "same", ...}`` (per-row shapes; ``"same"``:
the dataset's field of that name, passed through as it is, of any kind).

It is tried once at start on sample batches of the data (``trial.py``), which gives its
output schema (``Transform.outputs``): clients are told it at HELLO, and the server sizes its
slots and messages from it.
"""

from __future__ import annotations

import ast
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from batchfeed.shared.errors import DatasetError, WorkerError
from batchfeed.shared.schema import (
    FIXED,
    Field,
    Ragged,
    check_servable_dtype,
)

from .layout import ALIGN

if TYPE_CHECKING:

    pass

_TAG_TRANSFORM = 0x5452414E
SAMPLE_ROWS = (4, 3)  # rows of the two sample batches a transform is run on at start ...
SAMPLE_TRIES = 8  # ... out of at most this many (a sample with a bad row is replaced)

TransformFn = Callable[[dict, np.random.Generator], dict]
_NOT_RUN = object()


@dataclass(frozen=True)
class Transform:
    name: str  # "package.module:function", for error messages
    fn: TransformFn
    schema: tuple[Field | str, ...] | None  # declared output: fields, or names passed through
    outputs: tuple[Field, ...] | None = None  # derived at start from sample batches (derive)
    stable: bool = True  # the outputs' per-row shapes were the same in both samples
    row_bytes: dict[str, float] = field(default_factory=dict, hash=False, compare=False)

    def fields(self, inputs: tuple[Field, ...]) -> tuple[Field, ...] | None:
        """The output schema: as derived at start, else the declared one (the names passed
        through resolved against ``inputs``), else None."""
        if self.outputs is not None:
            return self.outputs
        if self.schema is None:
            return None
        by_name = {f.name: f for f in inputs}
        missing = [n for n in self.schema if isinstance(n, str) and n not in by_name]
        if missing:
            raise DatasetError(f"transform {self.name}: output_schema passes through "
                               f"{', '.join(map(repr, missing))}, which the dataset does not "
                               f"have (it has {', '.join(by_name)})")
        return tuple(by_name[f] if isinstance(f, str) else f for f in self.schema)

    def batch_bytes(self, rows: int) -> int:
        """About how many slot bytes a batch of ``rows`` rows of the output takes (ragged
        outputs at twice their mean length in the samples: padding), 0 before ``derive``."""
        if self.outputs is None:
            return 0
        total = 2 * ALIGN * len(self.outputs)
        for f in self.outputs:
            per_row = self.row_bytes.get(f.name, f.row_nbytes)
            total += math.ceil(rows * (per_row if f.kind == FIXED else 2 * per_row + 8))
        return total

    def rng(self, seed: int, epoch: int, global_batch: int) -> np.random.Generator:
        return np.random.default_rng([seed, epoch, global_batch, _TAG_TRANSFORM])

    def apply(self, batch: dict[str, np.ndarray], rng: np.random.Generator,
              where: str, ran: Any = _NOT_RUN) -> dict:
        """Run the transform and check what it returned (``ran``: what it returned, when it
        was run already); errors name it and the batch."""
        try:
            out = self.fn(batch, rng) if ran is _NOT_RUN else ran
        except Exception as exc:
            raise WorkerError(f"transform {self.name} raised on {where}: "
                              f"{type(exc).__name__}: {exc}") from None
        if not isinstance(out, dict) or not out:
            raise WorkerError(f"transform {self.name} returned {type(out).__name__} on {where}; "
                              "it must return a non-empty dict of field name -> numpy array")
        rows = None
        checked: dict = {}
        for name, arr in out.items():
            if isinstance(arr, Ragged) and isinstance(arr.values, np.ndarray) and isinstance(
                    arr.offsets, np.ndarray) and arr.offsets.ndim == 1 and len(arr.offsets):
                n, dtype = arr.rows, arr.values.dtype
                arr = Ragged(np.ascontiguousarray(arr.values),
                             np.asarray(arr.offsets, dtype=np.int64))
            elif isinstance(arr, np.ndarray) and arr.ndim:
                n, dtype = len(arr), arr.dtype
                arr = np.ascontiguousarray(arr)
            else:
                raise WorkerError(f"transform {self.name} returned {name!r}: "
                                  f"{type(arr).__name__} on {where}; every value must be a "
                                  "numpy array with a batch dimension, or a Ragged(values, "
                                  "offsets) for variable-length rows")
            if not isinstance(name, str):
                raise WorkerError(f"transform {self.name} returned a field named {name!r} on "
                                  f"{where}; field names are strings")
            try:
                check_servable_dtype(name, dtype)
            except ValueError as exc:
                raise WorkerError(f"transform {self.name} on {where}: {exc}") from None
            if rows is not None and n != rows:
                raise WorkerError(f"transform {self.name} returned fields with different "
                                  f"numbers of rows on {where}")
            rows = n
            checked[name] = arr
        return checked


def load_transform(spec: str) -> Transform:
    """Import ``package.module:function``, or call ``package.module:factory(key=value, ...)``
    (literal arguments only) for a configured one, at server start: errors here stop it."""
    module_name, sep, rest = spec.partition(":")
    attr, paren, args = rest.partition("(")
    attr = attr.strip()
    if not sep or not module_name or not attr.isidentifier() or (paren and not
                                                                  args.endswith(")")):
        raise DatasetError(f"--transform {spec!r} must look like package.module:function or "
                           "package.module:factory(key=value, ...)")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module itself failing
        raise DatasetError(f"cannot import transform module {module_name!r} "
                           f"({type(exc).__name__}: {exc}); is it installed or on PYTHONPATH?"
                           ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DatasetError(f"transform {spec!r}: module {module_name!r} has no function "
                           f"{attr!r}")
    if paren:
        positional, keywords = _literal_arguments(spec, args[:-1])
        try:
            fn = fn(*positional, **keywords)
        except Exception as exc:
            raise DatasetError(f"transform {spec!r}: {attr}(...) refused its arguments "
                               f"({type(exc).__name__}: {exc})") from None
        if not callable(fn):
            raise DatasetError(f"transform {spec!r}: {attr}(...) did not return a function")
    return Transform(spec, fn, _declared_schema(spec, getattr(fn, "output_schema", None)))


def _literal_arguments(spec: str, text: str) -> tuple[list, dict]:
    """The arguments of ``factory(...)``: Python literals only (numbers, strings, tuples)."""
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        assert isinstance(call, ast.Call)
        return ([ast.literal_eval(a) for a in call.args],
                {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg})
    except (SyntaxError, ValueError, AssertionError) as exc:
        raise DatasetError(f"transform {spec!r}: its arguments must be Python literals, e.g. "
                           f"(size=224, scale=(0.08, 1.0)) ({exc})") from None


def _declared_schema(spec: str, declared: object) -> tuple[Field | str, ...] | None:
    if declared is None:
        return None
    try:
        assert isinstance(declared, dict) and declared
        fields: list[Field | str] = []
        for name, kind in declared.items():
            if kind == "same":
                fields.append(str(name))
                continue
            dtype, shape = kind
            field = Field(str(name), np.dtype(dtype), tuple(int(d) for d in shape))
            check_servable_dtype(field.name, field.dtype)
            fields.append(field)
        return tuple(fields)
    except (AssertionError, TypeError, ValueError) as exc:
        raise DatasetError(f"transform {spec}: output_schema must map field names to "
                           f"(dtype, per-row shape) or \"same\" ({exc})") from None
