"""The catalog: the datasets a server serves, what clients receive of each, and the checks a
session's parameters need against the data.

- ``dataset(name)``: the named dataset, or the only one (``InvalidRequest`` naming the choices
  otherwise);
- ``served_fields(dataset)``: the dataset's fields, a transform's declared output, or () when
  a transform declares nothing (clients then learn the fields from the first batch);
- ``check_sampling_fields``: balanced and weighted sampling read a label or weights column;
  it is checked once per dataset and field, on a read-only mapping kept until ``close``.
"""

from __future__ import annotations

from batchfeed.shared.errors import InvalidRequest
from batchfeed.shared.plan import PlanParams, check_label, check_weights, column
from batchfeed.shared.schema import Field

from .dataset import DatasetSpec, attach_arrays
from .transform import Transform


class Catalog:
    def __init__(self, datasets: dict[str, DatasetSpec], transforms: dict[str, Transform]):
        self.datasets = datasets
        self.transforms = transforms
        self._columns: dict[str, tuple] = {}  # dataset -> (segments, arrays), read-only
        self._checked: set = set()

    def dataset(self, name: str | None) -> DatasetSpec:
        if name is None:
            if len(self.datasets) == 1:
                return next(iter(self.datasets.values()))
            raise InvalidRequest(
                f"this server serves several datasets ({', '.join(self.datasets)}); "
                "pick one with Client(..., dataset=NAME)"
            )
        try:
            return self.datasets[name]
        except KeyError:
            raise InvalidRequest(
                f"unknown dataset {name!r}; this server serves: {', '.join(self.datasets)}"
            ) from None

    def served_fields(self, dataset: DatasetSpec) -> tuple[Field, ...]:
        transform = self.transforms.get(dataset.name)
        if transform is None:
            return dataset.fields
        return transform.schema or ()

    def check_sampling_fields(self, dataset: DatasetSpec, params: PlanParams) -> None:
        for name, check in ((params.label, check_label), (params.weights, check_weights)):
            if name is None or (dataset.name, name, check) in self._checked:
                continue
            if dataset.name not in self._columns:
                self._columns[dataset.name] = attach_arrays(dataset)
            check(column(self._columns[dataset.name][1], name), name)
            self._checked.add((dataset.name, name, check))

    def close(self) -> None:
        for segments, _ in self._columns.values():
            for seg in segments:
                seg.close()
        self._columns.clear()
