"""Trying a transform at start: ``derive`` runs it once, in the main process before the workers
fork, on two small sample batches of each dataset it applies to, built the way a worker builds
them (``gather.batch_of``: the first rows of the dataset, or of its shard; ragged fields as
``Ragged``), and returns the transform with its output schema (``Transform.outputs``).  A
declared ``output_schema`` is checked against it.  A transform that cannot serve stops the start
with one line (``DatasetError``): a factory named without its call (``...:decode_image`` for
``...:decode_image(size=224)``), one that raises on the dataset (a field it lacks), or an output
that cannot be served.  A ``str`` or ``bytes`` field a transform passes through stays one.
Output shapes that differ between the two samples (padding to each batch's longest) are the
first sample's in the schema, and make the size an estimate (``stable`` False).  In packed
plans a transform sees packed rows, not dataset rows: ``derive_packed`` runs it on a sample of
those when a session first asks (at HELLO, in the main process).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from batchfeed.shared.errors import DatasetError, InvalidRequest, WorkerError
from batchfeed.shared.schema import (
    BYTES,
    RAGGED,
    STR,
    Field,
    Ragged,
    check_servable_field,
    describe_schema,
)

from .gather import batch_of
from .transform_runner import Transform

if TYPE_CHECKING:
    from batchfeed.shared.params import PlanParams

    from .dataset import DatasetSpec

SAMPLE_ROWS = (4, 3)  # rows of the two sample batches a transform is run on at start ...
SAMPLE_TRIES = 8  # ... out of at most this many (a sample with a bad row is replaced)



def derive(transform: Transform, spec: DatasetSpec, columns: Mapping[str, Any]) -> Transform:
    """``transform`` with its output schema for dataset ``spec``, from running it on two small
    sample batches built as a worker builds them; DatasetError (one line: what is wrong and
    what to do) when it cannot serve.  Runs in the calling process.

    A sample that fails may hold one bad row (an image that cannot be decoded fails its batch
    only, and the server serves on), so a failed sample is replaced by one from further in
    the data, up to ``SAMPLE_TRIES`` windows in all: only a transform that fails on every one
    (a field it lacks, a factory named without its call) stops the start."""
    lo, hi = spec.row_range
    starts = [lo, lo + SAMPLE_ROWS[0]] + [lo + k * (hi - lo) // SAMPLE_TRIES
                                          for k in range(1, SAMPLE_TRIES)]
    samples: list[tuple[dict, str]] = []
    tried: set[int] = set()
    for start in starts:
        n = SAMPLE_ROWS[min(len(samples), 1)]
        start = min(start, hi - 1)
        if start in tried or start + n > hi and samples:
            continue
        tried.add(start)
        idx = np.arange(start, min(start + n, hi))
        where = (f"a sample batch of dataset {spec.name!r} (rows {idx[0]}..{idx[-1]}) at "
                 "start")
        samples.append((batch_of(columns, spec, idx), where))
        if len(tried) >= SAMPLE_TRIES:
            break
    return _derive(transform, spec, samples)


def derive_packed(transform: Transform, spec: DatasetSpec, columns: Mapping[str, Any],
                  params: PlanParams) -> tuple[Field, ...]:
    """The output schema of ``transform`` on packed rows (``params.pack``): run on two rows
    packed from the dataset's first documents, as a worker packs them (InvalidRequest when it
    cannot serve them: the session asked for what this transform cannot take)."""
    from batchfeed.server.packing import PackedEpoch
    from batchfeed.server.plan_units import packed_fields

    assert params.pack is not None
    fields = packed_fields(params, columns)
    lengths = np.diff(fields[0][1])
    docs = int(np.searchsorted(np.cumsum(lengths), 2 * params.pack_length)) + 1
    order = np.arange(min(docs, len(lengths)))
    packed = PackedEpoch.build(lengths, order, params.pack_length)
    names = [*params.pack, f"{params.pack[0]}_segment_ids", f"{params.pack[0]}_positions"]
    samples = []
    for r0 in range(min(2, packed.rows)):
        rows = packed.gather(r0, r0 + 1, fields, params.pad_value)
        batch = dict(zip(names, [*rows.fields, rows.segment_ids, rows.positions]))
        samples.append((batch, f"a sample of packed rows ({params.pack_length} tokens) of "
                               f"dataset {spec.name!r}"))
    try:
        return _derive(transform, spec, samples).outputs or ()
    except DatasetError as exc:
        raise InvalidRequest(f"{exc}; in a packed plan (pack=) it sees packed rows: "
                             f"{', '.join(names)}") from None


def _derive(transform: Transform, spec: DatasetSpec,
            samples: list[tuple[dict, str]]) -> Transform:
    """The schema from the first two samples the transform serves (the rest are spares)."""
    inputs = {f.name: f for f in spec.fields}
    outs: list[dict] = []
    wheres: list[str] = []
    failure: str | None = None
    for batch, where in samples:
        if len(outs) == 2:
            break
        rng = transform.rng(0, 0, len(outs))
        try:
            out = transform.fn(batch, rng)
        except Exception as exc:
            failure = failure or _one_line(
                f"transform {transform.name} raised on {where}: {type(exc).__name__}: {exc} "
                f"(the batch has {', '.join(batch) or 'no fields'}); fix the transform, or "
                "serve data it can take")
            continue
        if callable(out) and not isinstance(out, dict):
            raise DatasetError(_factory_hint(transform) or _one_line(
                f"transform {transform.name} returned a function on {where}: it is a "
                "factory; name it with its call, e.g. --transform 'module:factory(key=value)'"))
        try:
            outs.append(transform.apply(batch, rng, where, ran=out))
            wheres.append(where)
        except WorkerError as exc:
            failure = failure or _one_line(f"{exc}; fix the transform")
    if not outs:
        raise DatasetError(_factory_hint(transform) or failure or
                           f"transform {transform.name}: the dataset has no rows to try it on")
    first = outs[0]
    fields, row_bytes = [], {}
    for name, value in first.items():
        if isinstance(value, Ragged):
            given = inputs.get(name)
            kind = given.kind if given is not None and given.kind in (STR, BYTES) and \
                value.values.dtype == np.uint8 else RAGGED
            f = Field(name, value.values.dtype, tuple(value.values.shape[1:]), kind)
            row_bytes[name] = f.row_nbytes * max(
                len(o[name].values) / max(1, o[name].rows) for o in outs)
        else:
            f = Field(name, value.dtype, tuple(value.shape[1:]))
            row_bytes[name] = f.row_nbytes * max(
                1.0, max(math.prod(o[name].shape[1:]) for o in outs) / max(1, math.prod(f.shape)))
        try:
            check_servable_field(name, f.dtype, f.shape)
        except ValueError as exc:
            raise DatasetError(_one_line(f"transform {transform.name} on {wheres[0]}: "
                                         f"{exc}")) from None
        fields.append(f)
    for other, where in zip(outs[1:], wheres[1:]):
        if list(other) != list(first) or any(_dtype(other[n]) != _dtype(first[n])
                                             for n in first):
            raise DatasetError(_one_line(
                f"transform {transform.name} returned other fields or dtypes on {where} "
                f"({_describe(other)}) than on the first sample ({_describe(first)}): every "
                "batch must have the same field names and dtypes"))
    stable = all(_row_shape(o[n]) == _row_shape(first[n]) for o in outs for n in first)
    derived = tuple(fields)
    declared = transform.fields(spec.fields)
    if declared is not None:
        _check_declared(transform, declared, derived, wheres[0])
        derived, stable = declared, True
    return replace(transform, outputs=derived, stable=stable, row_bytes=row_bytes)


def _check_declared(transform: Transform, declared: tuple[Field, ...],
                    derived: tuple[Field, ...], where: str) -> None:
    """The declared ``output_schema`` is what the transform returns (DatasetError if not)."""
    got = {f.name: f for f in derived}
    bad = [d.name for d in declared
           if d.name not in got or got[d.name].dtype != d.dtype or got[d.name].ragged
           != d.ragged or (not d.ragged and got[d.name].shape != d.shape)]
    if bad or set(got) != {d.name for d in declared}:
        raise DatasetError(_one_line(
            f"transform {transform.name} declares output_schema [{describe_schema(declared)}] "
            f"but returned [{describe_schema(derived)}] on {where}; make output_schema say what "
            "it returns, or drop it (the server reads the schema off a sample batch)"))


def _factory_hint(transform: Transform) -> str | None:
    """When ``transform.fn`` is a factory named without its call (``mod:decode_image`` for
    ``mod:decode_image(size=224)``), the line that says so; else None."""
    if "(" in transform.name:
        return None
    factory: Any = transform.fn
    try:
        made = factory()
    except Exception:
        return None
    if not callable(made):
        return None
    attr = transform.name.partition(":")[2].strip()
    example = f"{attr}()"
    try:
        params = [p for p in inspect.signature(transform.fn).parameters.values()
                  if p.default is not inspect.Parameter.empty]
        if params:
            example = f"{attr}({params[0].name}={params[0].default!r})"
    except (TypeError, ValueError):
        pass
    return (f"--transform {transform.name} names a factory without its call: {attr}(...) "
            f"makes the transform; write {example} (e.g. --transform "
            f"\"{transform.name.partition(':')[0]}:{example}\")")


def _one_line(text: str, most: int = 600) -> str:
    text = " ".join(text.split())
    return text if len(text) <= most else text[: most - 3] + "..."


def _dtype(value: Any) -> np.dtype:
    return value.values.dtype if isinstance(value, Ragged) else value.dtype


def _row_shape(value: Any) -> tuple[int, ...]:
    return tuple(value.values.shape[1:]) if isinstance(value, Ragged) else tuple(value.shape[1:])


def _describe(out: dict) -> str:
    return ", ".join(f"{n}: {_dtype(v)}" for n, v in out.items())
