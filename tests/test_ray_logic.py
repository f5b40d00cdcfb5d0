"""batchfeed.ray's logic, without Ray or processes: the elastic policy (the trainers' wait share
between two sets of reports, and when a replica is added: Cachew's rule, with a maximum,
patience and time to settle), arguments refused before Ray is touched, Ray imported only when
used, and the job's keys."""

from __future__ import annotations

import os
import stat
import sys

import pytest

import batchfeed.ray as bfray
from batchfeed import InvalidRequest, ResourceError
from batchfeed.ray_elastic import WaitShareRule, wait_share
from batchfeed.ray_loader import JobKeys


def stats(wait: float, wall: float) -> dict[str, float]:
    return {"wait_s": wait, "wall_s": wall, "batches": 0}


def test_the_wait_share_is_the_trainers_summed_waiting_over_their_summed_time() -> None:
    before = {"0": stats(1.0, 10.0), "1": stats(0.0, 10.0)}
    now = {"0": stats(2.0, 12.0), "1": stats(0.5, 12.0), "2": stats(5.0, 5.0)}  # "2" is new
    assert wait_share(before, now) == pytest.approx(1.5 / 4.0)


def test_no_share_before_a_trainer_reported_twice_or_while_none_moved() -> None:
    assert wait_share({}, {"0": stats(1.0, 2.0)}) is None
    assert wait_share({"0": stats(1.0, 2.0)}, {"0": stats(1.0, 2.0)}) is None


def test_a_replica_is_added_only_after_patience_periods_above_the_threshold() -> None:
    rule = WaitShareRule(threshold=0.2, max_replicas=3, patience=2, settle=3)
    assert not rule.should_add([0.5], replicas=1, since_added=5)
    assert not rule.should_add([0.1, 0.5], replicas=1, since_added=5)
    assert not rule.should_add([None, 0.5], replicas=1, since_added=5)
    assert rule.should_add([0.1, 0.5, 0.3], replicas=1, since_added=5)


def test_no_replica_beyond_the_maximum_nor_before_the_last_one_settled() -> None:
    rule = WaitShareRule(threshold=0.2, max_replicas=2, patience=1, settle=3)
    assert not rule.should_add([0.9], replicas=2, since_added=10)
    assert not rule.should_add([0.9], replicas=1, since_added=2)
    assert rule.should_add([0.9], replicas=1, since_added=3)


@pytest.mark.parametrize("kw", [{"threshold": 0}, {"threshold": 1.5}, {"max_replicas": 0},
                                {"patience": 0}, {"settle": 1.5}])
def test_a_bad_rule_is_refused_saying_what_it_needs(kw) -> None:
    with pytest.raises(InvalidRequest):
        WaitShareRule(**kw)


@pytest.mark.parametrize("kw", [{"shards": 0}, {"replicas": "2"}, {"workers": 0},
                                {"shard": (0, 2)}, {"bind": "tcp://127.0.0.1:0"}])
def test_bad_arguments_are_refused_before_ray_is_asked(kw) -> None:
    with pytest.raises(InvalidRequest):
        bfray.start_loaders({"x": [1, 2, 3]}, **kw)


def test_ray_is_imported_only_when_used_and_its_absence_says_what_to_install(monkeypatch
                                                                            ) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    with pytest.raises(ResourceError, match=r"pip install 'batchfeed\[ray\]'"):
        bfray.start_loaders({"x": [1, 2, 3]})


def test_the_jobs_keys_reach_the_client_as_private_files() -> None:
    keys = JobKeys.make()
    assert keys.client_public != JobKeys.make().client_public  # new keys per job
    handle = bfray.LoaderSet(registry=None, keys=keys, name="test")
    secret, public = handle.curve()
    assert handle.curve() == (secret, public)  # written once per process
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(secret)).st_mode) == 0o700
    with open(secret) as s, open(public) as p:
        assert "secret-key" in s.read() and "secret-key" not in p.read()
