"""Client checkpoints: what a state dict is (``STATE_FORMAT``) and what it says the run was taken
on (``TakenOn``: the dataset's size, its fingerprint, the server's transform), read and checked
once, for ``Client.from_state_dict`` and ``BatchfeedDataset.load_state_dict`` alike."""

from __future__ import annotations

import dataclasses
from typing import Any

from batchfeed.shared.errors import DataMismatch, InvalidArgument, InvalidRequest, ProtocolError
from batchfeed.shared.fingerprint import Fingerprint

from .link import Welcome

STATE_FORMAT = "batchfeed-client-1"
SIZES = {"rows": "rows", "batches_per_epoch": "batches per epoch"}  # what a state was taken on


@dataclasses.dataclass(frozen=True)
class TakenOn:
    """What a checkpoint was taken on, read from a state dict (checked: InvalidArgument)."""

    sizes: dict[str, int]
    fingerprint: Fingerprint | None = None
    transform: str | None = None
    has_transform: bool = False  # older states did not record one

    @classmethod
    def of(cls, state: dict[str, Any]) -> TakenOn:
        sizes = {key: state[key] for key in SIZES if key in state}
        for key, value in sizes.items():
            if type(value) is not int or value < 0:
                raise InvalidArgument(f"the state's {key!r} must be an int >= 0, got "
                                      f"{value!r}; pass what state_dict() returned")
        fingerprint = None
        if state.get("fingerprint") is not None:
            try:
                fingerprint = Fingerprint.from_wire(state["fingerprint"])
            except ProtocolError as exc:
                raise InvalidArgument(f"the state's 'fingerprint' is damaged ({exc}); pass "
                                      "what state_dict() returned") from None
        transform = state.get("transform")
        if transform is not None and not isinstance(transform, str):
            raise InvalidArgument(f"the state's 'transform' must be a string, got "
                                  f"{transform!r:.80}")
        return cls(sizes, fingerprint, transform, "transform" in state)

    def check(self, now: Welcome, where: str) -> None:
        """Refuse to resume on data other than the checkpoint's, as ``now`` (a server's
        WELCOME) describes it: another size (InvalidRequest), or another fingerprint or
        transform (DataMismatch)."""
        here = {"rows": now.rows, "batches_per_epoch": now.batches_per_epoch}
        differ = [key for key in SIZES if key in self.sizes and self.sizes[key] != here[key]]
        if differ:
            then_ = ", ".join(f"{self.sizes[key]:,} {SIZES[key]}" for key in differ)
            now_ = ", ".join(f"{here[key]:,} {SIZES[key]}" for key in differ)
            raise InvalidRequest(
                f"this checkpoint was taken on a dataset with {then_}, but the dataset "
                f"{now.dataset!r} served at {where} has {now_}: resuming would give other "
                "rows than the checkpointed run.  Restore against the dataset the checkpoint "
                "was taken on (pass dataset=NAME if the server serves several), or start a new "
                "run with Client(...)")
        if self.fingerprint is not None and (now.fingerprint is None or
                                             not now.fingerprint.agrees(self.fingerprint)):
            raise DataMismatch(
                f"this checkpoint was taken on data with fingerprint {self.fingerprint}, but "
                f"the dataset {now.dataset!r} served at {where} has fingerprint "
                f"{now.fingerprint}: it is other data (same size or not), and resuming would "
                "give other rows than the checkpointed run.  Serve the files the checkpoint "
                "was taken on, or start a new run with Client(...)")
        if self.has_transform and self.transform != now.transform:
            raise DataMismatch(
                f"this checkpoint was taken from a server running transform {self.transform}, "
                f"but the server at {where} runs {now.transform}: its batches would differ "
                "from the checkpointed run's.  Serve with the same --transform, or start a new "
                "run")
