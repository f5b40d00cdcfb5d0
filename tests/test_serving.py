"""``batchfeed.serve(data)`` from a user's script: what it does with its process at exit and
with data it cannot serve."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import pid_alive

import batchfeed
from batchfeed import DatasetError

SCRIPT = """
import numpy as np, batchfeed
server = batchfeed.serve({"x": np.zeros((10, 2))}, workers=1)
print(server.pid, flush=True)
""" # never stopped: the script just ends


def test_a_script_that_never_stops_its_server_still_exits_and_stops_it() -> None:
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert not pid_alive(int(done.stdout.split()[0]))


def test_a_script_whose_client_fails_outside_a_with_block_still_exits() -> None:
    script = SCRIPT + "batchfeed.Client(server.address, batch_size=0)\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 1 and "InvalidArgument" in done.stderr, done.stderr
    assert not pid_alive(int(done.stdout.split()[0]))


@pytest.mark.parametrize("column,match", [
    ([[[1], [2, 3]], [[4]]], "row 0 is a nested list whose inner lists differ in length"),
    ([1, np.arange(3)], "mixes numbers and arrays"),
    ([None, None], "not Python objects or None"),
])
def test_columns_serve_cannot_hold_are_refused_with_what_to_do(column, match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        batchfeed.serve({"y": column})


def test_a_list_of_numbers_is_a_fixed_field_and_a_list_of_arrays_a_ragged_one() -> None:
    with batchfeed.serve({"y": [0, 1, 2], "v": [np.arange(3), np.arange(2), np.arange(3)]},
                         workers=1) as srv:
        assert "y: int64[]" in srv.ready_line and "v: int64[*]" in srv.ready_line
        with batchfeed.Client(srv.address, batch_size=3, shuffle="none") as client:
            [batch] = list(client.epoch(0))
    assert batch["y"].tolist() == [0, 1, 2] and batch["v_lengths"].tolist() == [3, 2, 3]
