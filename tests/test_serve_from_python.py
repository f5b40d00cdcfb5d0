"""``batchfeed.serve()`` refuses a bad option in the caller and names the Python argument, not
the command line's flag (issue 21: its bind refusal said ``--insecure``)."""

from __future__ import annotations

import numpy as np
import pytest

import batchfeed
from batchfeed import InvalidArgument


def test_a_non_loopback_bind_names_insecure_true() -> None:
    with pytest.raises(InvalidArgument) as info:
        batchfeed.serve({"x": np.arange(10)}, bind="tcp://0.0.0.0:0", workers=1)
    message = str(info.value)
    assert "refusing to bind tcp://0.0.0.0:0 without encryption" in message
    assert "pass insecure=True on a trusted private network" in message
    assert "curve_secret_key= and authorized_keys=" in message
    assert "--" not in message and isinstance(info.value, ValueError)


def test_a_metrics_bind_off_loopback_names_the_python_arguments() -> None:
    with pytest.raises(InvalidArgument) as info:
        batchfeed.serve({"x": np.arange(10)}, workers=1, metrics_port=0,
                        metrics_bind="0.0.0.0")
    assert "Keep metrics_bind= on loopback" in str(info.value)
    assert "pass insecure=True" in str(info.value) and "--" not in str(info.value)
