"""``PlanParams``: everything that decides a client's batches, validated once, on construction.

Users' conventions are taken and stored as ours (``shuffle=True``/``False`` as ``"full"``/
``"none"``, numpy integers as ints), so the wire format stays plain.  Besides the order
(shuffle, seed, sampling) and the cut (batch size, drop_last, ranks), a plan says how
variable-length fields are served:

- ``ragged``: ``"pad"`` (each batch padded with ``pad_value`` to its longest row, plus
  ``f_lengths``) or ``"flat"`` (values plus ``f_offsets``); ``max_length`` truncates rows;
- ``pack`` (ragged fields, aligned) and ``pack_length``: the epoch's documents packed into
  rows of exactly ``pack_length`` tokens (``batch_size`` is then packed rows per batch);
- ``max_tokens`` (with ``token_field``): batches of documents whose padded size stays within
  ``max_tokens`` tokens, instead of ``batch_size`` rows.

Constructing one checks the arguments where they were given: ``InvalidArgument`` (a
``ValueError``; ``InvalidArgumentType`` for a wrong type, also a ``TypeError``).  ``from_wire``
is how a server reads a client's: what it refuses is an ``InvalidRequest``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import BatchfeedError, InvalidArgument, InvalidArgumentType, InvalidRequest

SHUFFLE_MODES = ("full", "buffer", "none")
SAMPLING_MODES = ("uniform", "balanced", "weighted")
RAGGED_MODES = ("pad", "flat")
MAX_SEED = 2**63 - 1
_INT_FIELDS = ("batch_size", "seed", "buffer_size", "rank", "world_size", "epoch_rows",
               "max_length", "pack_length", "max_tokens")


def _check_int(name: str, value: object, low: int, high: int | None = None,
               refused: type[BatchfeedError] = InvalidRequest) -> None:
    """``value`` is an int in [low, high]; otherwise ``refused`` (a server's check:
    InvalidRequest), or for a PlanParams argument InvalidArgumentType if it is no int."""
    if type(value) is not int or value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        if refused is InvalidArgument and type(value) is not int:
            refused = InvalidArgumentType
        raise refused(f"{name} must be an int {bound}, got {value!r}")


def _int_argument(name: str, value: object, low: int, high: int | None = None) -> None:
    _check_int(name, value, low, high, InvalidArgument)


@dataclass(frozen=True)
class PlanParams:
    """Everything that decides a client's batches (see the module docstring)."""

    batch_size: int
    shuffle: str = "full"
    seed: int = 0
    buffer_size: int = 0
    drop_last: bool = False
    rank: int = 0
    world_size: int = 1
    sampling: str = "uniform"
    label: str | None = None
    weights: str | None = None
    epoch_rows: int | None = None
    ragged: str = "pad"
    pad_value: float = 0
    max_length: int | None = None
    pack: tuple[str, ...] | None = None
    pack_length: int = 0
    max_tokens: int | None = None
    token_field: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.shuffle, (bool, np.bool_)):  # torch's DataLoader(shuffle=...)
            object.__setattr__(self, "shuffle", "full" if self.shuffle else "none")
        for name in _INT_FIELDS:  # numpy integers count as ints (bools never do)
            if isinstance(getattr(self, name), np.integer):
                object.__setattr__(self, name, int(getattr(self, name)))
        if isinstance(self.drop_last, np.bool_):
            object.__setattr__(self, "drop_last", bool(self.drop_last))
        if isinstance(self.pack, list):  # from the wire
            object.__setattr__(self, "pack", tuple(self.pack))
        for name in ("label", "weights", "token_field"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise InvalidArgumentType(f"{name} must be a field name (a string), got "
                                     f"{getattr(self, name)!r:.80}")
        if self.pack is not None and not isinstance(self.pack, tuple):
            raise InvalidArgumentType(f"pack names the ragged fields to pack, e.g. "
                                 f"pack={{'tokens': 2048}}, got {self.pack!r:.80}")
        _int_argument("batch_size", self.batch_size, 1)
        if not isinstance(self.shuffle, str) or self.shuffle not in SHUFFLE_MODES:
            modes = ", ".join(map(repr, SHUFFLE_MODES))
            raise InvalidArgument(f"shuffle must be one of {modes}, got {self.shuffle!r}")
        _int_argument("seed", self.seed, 0, MAX_SEED)
        if self.shuffle == "buffer" and not (type(self.buffer_size) is int
                                             and self.buffer_size >= 1):
            raise InvalidArgument(f"shuffle='buffer' needs buffer_size >= 1, "
                                 f"got {self.buffer_size!r}")
        _int_argument("buffer_size", self.buffer_size, 0)
        if type(self.drop_last) is not bool:
            raise InvalidArgumentType(f"drop_last must be True or False, got {self.drop_last!r}")
        _int_argument("world_size", self.world_size, 1)
        if type(self.rank) is not int or not 0 <= self.rank < self.world_size:
            raise InvalidArgument(f"rank {self.rank!r} is out of range for world_size "
                                 f"{self.world_size}: ranks go from 0 to {self.world_size - 1}")
        self._check_sampling()
        self._check_ragged()

    def _check_ragged(self) -> None:
        if not isinstance(self.ragged, str) or self.ragged not in RAGGED_MODES:
            raise InvalidArgument(f"ragged must be 'pad' or 'flat', got {self.ragged!r}")
        if isinstance(self.pad_value, bool) or not isinstance(self.pad_value, (int, float)):
            raise InvalidArgumentType(f"pad_value must be a number, got {self.pad_value!r}")
        if self.max_length is not None:
            _int_argument("max_length", self.max_length, 1)
        if self.pack is not None:
            if not self.pack or not all(isinstance(f, str) and f for f in self.pack):
                raise InvalidArgument(f"pack names the ragged fields to pack, e.g. "
                                     f"pack={{'tokens': 2048}}, got {self.pack!r}")
            _int_argument("pack_length", self.pack_length, 1)
            if self.sampling != "uniform" or self.max_tokens is not None:
                raise InvalidArgument("pack= packs every document once per epoch: it goes with "
                                     "sampling='uniform' and without max_tokens")
            if self.max_length is not None:
                raise InvalidArgument("pack= keeps whole documents (one continues in the next "
                                     "row); leave max_length unset")
        elif self.pack_length:
            raise InvalidArgument("pack_length goes with pack=")
        if self.max_tokens is not None:
            _int_argument("max_tokens", self.max_tokens, 1)
            if self.sampling != "uniform" or self.shuffle != "full":
                raise InvalidArgument("max_tokens= shuffles documents by itself: it goes with "
                                     "sampling='uniform' and shuffle='full'")
            if self.batch_size != 1:
                raise InvalidArgument("max_tokens= replaces batch_size (leave it unset)")
        elif self.token_field is not None:
            raise InvalidArgument("token_field goes with max_tokens=")

    @property
    def units(self) -> str:
        """What a plan's epoch counts: dataset rows, packed rows, or token-budget batches."""
        return "packed" if self.pack else "budget" if self.max_tokens else "rows"

    def _check_sampling(self) -> None:
        if not isinstance(self.sampling, str) or self.sampling not in SAMPLING_MODES:
            raise InvalidArgument(f"sampling must be one of "
                                 f"{', '.join(map(repr, SAMPLING_MODES))}, got {self.sampling!r}")
        needs = {"balanced": ("label", self.label), "weighted": ("weights", self.weights)}
        for mode, (arg, value) in needs.items():
            if self.sampling == mode and not (isinstance(value, str) and value):
                raise InvalidArgument(f"sampling={mode!r} needs {arg}=FIELD, the name of the "
                                     f"dataset field that holds the {arg}")
        if self.label is not None and self.sampling != "balanced":
            raise InvalidArgument("label= goes with sampling='balanced'")
        if self.weights is not None and self.sampling != "weighted":
            raise InvalidArgument("weights= goes with sampling='weighted'")
        if self.sampling == "uniform":
            if self.epoch_rows is not None:
                raise InvalidArgument("epoch_rows= goes with sampling='balanced' or 'weighted'; "
                                     "a uniform epoch is every row once")
        else:
            if self.shuffle != "full":
                raise InvalidArgument(f"sampling={self.sampling!r} shuffles by itself; leave "
                                     f"shuffle at 'full' (got {self.shuffle!r})")
            if self.epoch_rows is not None:
                _int_argument("epoch_rows", self.epoch_rows, 1)

    def to_wire(self) -> dict:
        return asdict(self)

    @classmethod
    def from_wire(cls, data: object,
                  refused: type[BatchfeedError] = InvalidRequest) -> PlanParams:
        """Parameters as a peer sent them (or a checkpoint holds them); what is wrong with them
        is a ``refused`` (a server's: InvalidRequest; a client reading a state passes
        InvalidArgument)."""
        if not isinstance(data, dict):
            raise refused("plan parameters must be a map")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise refused(f"unknown plan parameters {unknown}; known: {sorted(known)}")
        if "batch_size" not in data:
            raise refused("plan parameters need batch_size")
        try:
            return cls(**data)
        except InvalidArgument as exc:
            raise refused(str(exc)) from None
