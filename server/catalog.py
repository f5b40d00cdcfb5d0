"""The catalog: the datasets a server serves, what clients receive of each, and the checks a
session's parameters need against the data.

- ``dataset(name)``: the named dataset, or the only one (``InvalidRequest`` naming the choices
  otherwise);
- ``served_fields(dataset, plan)``: the dataset's fields, or a transform's output as derived at
  start from sample batches (``transform.derive``); in a packed plan, what the transform
  returns on packed rows (derived at the first HELLO that asks, then kept);
- ``check_plan``: what a session's plan needs of the server: its epoch order within the
  server's budget (``--max-order-mb``; balanced and weighted sampling choose their epoch's
  length), and for balanced and weighted sampling a label or weights column that can be
  used, checked once per dataset and field;
- ``estimate``: one batch's bytes in a slot, from the served fields; a batch asked of more
  rows than the dataset has is one batch of all of them, and says so when it does not fit.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from batchfeed.server.plan_units import budget_bounds, plan_units
from batchfeed.shared.errors import DatasetError, InvalidRequest
from batchfeed.shared.plan import (
    BatchPlan,
    PlanParams,
    check_label,
    check_weights,
    column,
    index_dtype,
)
from batchfeed.shared.schema import RAGGED, Field
from batchfeed.shared.shm import human_bytes

from .dataset import Columns, DatasetSpec
from .layout import ALIGN
from .sizing import BatchEstimate
from .transform_runner import Transform
from .trial import derive_packed

log = logging.getLogger("batchfeed.server")


class Watched(Protocol):
    """A dataset whose held files are watched (``dataset.SharedDataset``)."""

    spec: DatasetSpec

    def changed(self) -> str | None: ...


class Catalog:
    def __init__(self, datasets: dict[str, DatasetSpec], transforms: dict[str, Transform],
                 columns: dict[str, Columns], held: Sequence[Watched] = ()):
        self.datasets = datasets
        self.transforms = transforms
        self._columns = columns  # dataset -> its fields' read-only views
        self._checked: set = set()
        self._held = [d for d in held if d.spec.files]  # datasets mapped from held files
        self._packed_outputs: dict[tuple, tuple[Field, ...]] = {}  # (dataset, pack, L) -> fields
        self.broken: dict[str, str] = {}  # dataset -> why it is served no more

    def changed(self) -> list[tuple[str, str]]:
        """Datasets whose held files changed in place since the last look, and how: they are
        served no more (``dataset`` refuses them, saying why)."""
        out = []
        for d in self._held:
            name = d.spec.name
            why = d.changed() if name not in self.broken else None
            if why is not None:
                self.broken[name] = why
                log.error("dataset %s: %s", name, why)
                out.append((name, why))
        return out

    def dataset(self, name: str | None) -> DatasetSpec:
        if name is None:
            if len(self.datasets) != 1:
                raise InvalidRequest(
                    f"this server serves several datasets ({', '.join(self.datasets)}); "
                    "pick one with Client(..., dataset=NAME)"
                )
            name = next(iter(self.datasets))
        if name not in self.datasets:
            raise InvalidRequest(
                f"unknown dataset {name!r}; this server serves: {', '.join(self.datasets)}")
        if name in self.broken:
            raise DatasetError(f"dataset {name!r} is served no more: {self.broken[name]}")
        return self.datasets[name]

    def served_fields(self, dataset: DatasetSpec,
                      plan: BatchPlan | None = None) -> tuple[Field, ...]:
        """What clients receive: the dataset's fields, or its transform's output (on packed
        rows for a packed plan)."""
        transform = self.transforms.get(dataset.name)
        if transform is None:
            return dataset.fields
        if plan is not None and plan.params.pack is not None:
            return self._packed_output(dataset, transform, plan.params)
        return transform.fields(dataset.fields) or ()

    def _packed_output(self, dataset: DatasetSpec, transform: Transform,
                       params: PlanParams) -> tuple[Field, ...]:
        key = (dataset.name, params.pack, params.pack_length, params.pad_value)
        if key not in self._packed_outputs:
            self._packed_outputs[key] = derive_packed(transform, dataset,
                                                      self.columns(dataset), params)
        return self._packed_outputs[key]

    def columns(self, dataset: DatasetSpec) -> Columns:
        """The dataset's columns, read-only."""
        return self._columns[dataset.name]

    def plan(self, dataset: DatasetSpec, params: PlanParams, max_order_bytes: int) -> BatchPlan:
        """A session's plan, checked against the data and the server's limits."""
        units = None
        if dataset.shard is not None and params.pack is not None:
            raise InvalidRequest("pack= needs every document on one server (a packed row spans "
                                 "documents of several shards): serve the corpus unsharded, "
                                 "as replicas")
        if params.units != "rows":
            units = plan_units(params, self.columns(dataset), dataset.name, dataset.fields)
        plan = BatchPlan(dataset.rows, params, data_key=dataset.name, units=units)
        itemsize = np.dtype(index_dtype(plan.n_rows)).itemsize
        budget = max(max_order_bytes, plan.n_rows * itemsize)  # one pass over the data is fine
        order_bytes = plan.epoch_rows * itemsize
        if order_bytes > budget and params.units == "rows":
            most = budget // itemsize
            raise InvalidRequest(
                f"epoch_rows={plan.epoch_rows:,} needs an epoch order of "
                f"{human_bytes(order_bytes)}, more than this server allows per epoch "
                f"({human_bytes(budget)}, --max-order-mb): ask for at most "
                f"{most:,} rows per epoch, or restart the server with a larger --max-order-mb")
        self._check_sampling_fields(dataset, plan.params)
        check_pad_value(dataset.fields, params)
        transform = self.transforms.get(dataset.name)
        if transform is not None and params.pack is not None:
            self._packed_output(dataset, transform, params)  # one it cannot take: refused now
        return plan

    def estimate(self, dataset: DatasetSpec, plan: BatchPlan) -> BatchEstimate:
        """One batch's bytes in a slot, for sizing the session's messages."""
        params, served = plan.params, self.served_fields(dataset, plan)
        transform = self.transforms.get(dataset.name)
        fields = served or dataset.fields
        growth = 1 if served or transform is None else 4
        if params.pack is not None:
            per_token = sum(f.dtype.itemsize for f in dataset.fields if f.name in params.pack)
            if transform is not None:  # its output on packed rows, per token
                per_token = max(per_token, sum(f.row_nbytes for f in served))
            return BatchEstimate(plan.batch_size * params.pack_length * (per_token + 8),
                                 exact=transform is None, growth=growth,
                                 what=f"one batch of {plan.batch_size} packed rows")
        rows, exact = min(plan.batch_size, plan.rank_rows), True
        what = f"one batch of {rows} rows"
        hint = ""
        if plan.batch_size > plan.rank_rows:
            whole = "the dataset" if plan.rank_rows == plan.epoch_rows else "this rank's share"
            what = (f"batch_size={plan.batch_size:,} is larger than {whole} "
                    f"({plan.rank_rows:,} rows), so its one batch an epoch, all of those rows,")
            hint = f"a batch_size of at most {plan.rank_rows:,}"
        if params.max_tokens is not None:
            starts = budget_bounds(params, self.columns(dataset), dataset.name,
                                   dataset.fields)[1]
            rows, exact = int(np.diff(starts).max(initial=1)), False
            what = f"one batch of {rows} rows"
        if transform is not None and transform.outputs is not None:
            nbytes = transform.batch_bytes(rows)
            exact = exact and transform.stable and all(not f.ragged for f in served)
            return BatchEstimate(nbytes, exact=exact, what=what, hint=hint)
        nbytes = ALIGN * 2 * len(fields)
        for f in fields:
            st = dict(zip(dataset.fields, dataset.storage)).get(f)
            if not f.ragged:
                nbytes += rows * f.row_nbytes
            elif params.max_tokens is not None and f.kind == "ragged":
                nbytes += params.max_tokens * f.row_nbytes + 8 * (rows + 1)
            else:  # twice the mean row (padding), plus lengths or offsets
                mean = (st.n_values // max(1, dataset.rows) + 1) if st else 1
                nbytes += rows * (2 * mean * f.row_nbytes + 8) + 8
                exact = False
        return BatchEstimate(nbytes, exact=exact and growth == 1, growth=growth, what=what,
                             hint=hint)

    def _check_sampling_fields(self, dataset: DatasetSpec, params: PlanParams) -> None:
        for name, check in ((params.label, check_label), (params.weights, check_weights)):
            if name is None or (dataset.name, name, check) in self._checked:
                continue
            check(column(self.columns(dataset), name), name)
            self._checked.add((dataset.name, name, check))

    def close(self) -> None:
        self._columns = {}


def check_pad_value(fields: tuple[Field, ...], params: PlanParams) -> None:
    """InvalidRequest unless ``pad_value`` fits every field it pads (a value that does not fit
    the dtype would fail every batch, or wrap around)."""
    pad = params.pad_value
    padded = [f for f in fields if f.kind == RAGGED and (
        f.name in params.pack if params.pack is not None else params.ragged == "pad")]
    for f in padded:
        kind = f.dtype.kind
        if kind in "iu":
            info = np.iinfo(f.dtype)
            fits = float(pad).is_integer() and info.min <= pad <= info.max
            allowed = f"an integer in [{info.min}, {info.max}]"
        elif kind == "b":
            fits, allowed = pad in (0, 1), "0 or 1"
        elif kind == "f":
            finfo = np.finfo(f.dtype)
            fits = not np.isfinite(pad) or abs(pad) <= finfo.max
            allowed = f"a number within +-{float(finfo.max):.4g}"
        else:
            fits, allowed = True, ""
        if not fits:
            raise InvalidRequest(f"pad_value={pad!r} does not fit field {f.name!r} "
                                 f"({f.dtype}): pad with {allowed}, e.g. pad_value=0")
