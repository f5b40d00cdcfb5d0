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

``derive`` runs the transform once at start, in the main process before the workers fork, on
two small sample batches of each dataset it applies to, built the way a worker builds them
(``gather.batch_of``: the first rows of the dataset, or of its shard; ragged fields as
``Ragged``).  What it returns is the output schema (``Transform.outputs``): clients are told it
at HELLO, and the server sizes its slots and messages from it.  A declared ``output_schema``
is checked against it.  A transform that cannot serve stops the start with one line
(``DatasetError``): a factory named without its call (``...:decode_image`` for
``...:decode_image(size=224)``), one that raises on the dataset (a field it lacks), or an output
that cannot be served.  A ``str`` or ``bytes`` field a transform passes through stays one.
Output shapes that differ between the two samples (padding to each batch's longest) are the
first sample's in the schema, and make the size an estimate (``stable`` False).  In packed
plans a transform sees packed rows, not dataset rows: ``derive_packed`` runs it on a sample of
those when a session first asks (at HELLO, in the main process).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from batchfeed.shared.errors import DatasetError, InvalidRequest, WorkerError
from batchfeed.shared.schema import (
    BYTES,
    FIXED,
    RAGGED,
    STR,
    Field,
    Ragged,
    check_servable_dtype,
    check_servable_field,
    describe_schema,
)

if TYPE_CHECKING:
    from batchfeed.shared.params import PlanParams

    from .dataset import DatasetSpec

_TAG_TRANSFORM = 0x5452414E
SAMPLE_ROWS = (4, 3)  # rows of the two sample batches a transform is run on at start ...
SAMPLE_TRIES = 8  # ... out of at most this many (a sample with a bad row is replaced)
ALIGN = 64  # as gather.ALIGN: each output's region in a slot starts aligned

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


# ---------------------------------------------------------------------------------------------
# The sample run at start: the output schema, and the mistakes that would fail every batch


def derive(transform: Transform, spec: DatasetSpec, columns: Mapping[str, Any]) -> Transform:
    """``transform`` with its output schema for dataset ``spec``, from running it on two small
    sample batches built as a worker builds them; DatasetError (one line: what is wrong and
    what to do) when it cannot serve.  Runs in the calling process.

    A sample that fails may hold one bad row (an image that cannot be decoded fails its batch
    only, and the server serves on), so a failed sample is replaced by one from further in
    the data, up to ``SAMPLE_TRIES`` windows in all: only a transform that fails on every one
    (a field it lacks, a factory named without its call) stops the start."""
    from .gather import batch_of  # gather imports this module

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
    from batchfeed.shared.packing import PackedEpoch
    from batchfeed.shared.units import packed_fields

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
