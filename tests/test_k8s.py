"""Kubernetes: the manifests in deploy/k8s, and ``batchfeed probe``, which their probes run.

The manifests are rendered with ``kubectl kustomize`` (offline), once per variant: the default
(one loader pod per shard) and ``overlays/replicas`` (whole-dataset replicas).  The renderings
are checked three ways:

- the promises this project makes about them, read off the rendered objects (shared memory
  sized for the shard and the ring, probes that speak the protocol, non-root read-only pods,
  trainers-only network access, read-only keys, shard numbering);
- ``kubernetes-validate`` against the schemas of the oldest Kubernetes we support (1.28, for
  the pod-index label) and of the newest the package ships;
- ``checkov`` (framework kubernetes): no failed check; a skip must carry its reason, in a
  ``checkov.io/skipN: CKV_...=reason`` annotation (kustomize drops YAML comments).

Each part skips, saying which tool is missing, where its tool is not installed.  No cluster is
contacted: what a live cluster would show (scheduling, DNS, the probes passing in a pod) is
not checked here.  The probe itself is tested against real servers, with and without CURVE.
"""

from __future__ import annotations

import ast
import functools
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from conftest import free_port

from batchfeed import probe
from batchfeed.launch import ServerProcess
from batchfeed.shared.curve_keys import make_keys

try:
    import yaml
except ImportError:  # pragma: no cover - PyYAML comes with kubernetes-validate
    yaml = None

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
VARIANTS = {"sharded": K8S, "replicas": K8S / "overlays" / "replicas"}
MIB = 2**20
OLDEST_KUBERNETES = (1, 28)  # apps.kubernetes.io/pod-index, the shard number of a loader pod
# The sizing formula in deploy/k8s/base/loader-statefulset.yaml:
PROCESS_MIB = 100  # memory per server process (the front end and each worker)
SLACK_MIB = 32  # ring header, fast-path lease tables, rounding
LOADER_PORT = 5555
TRAINER_LABEL = ("batchfeed/trainer", "true")
WORKLOADS = ("StatefulSet", "Deployment", "DaemonSet", "Job")


# ---------------------------------------------------------------------------------------------
# Rendering and reading the objects.


def kubectl_missing() -> str | None:
    if yaml is None:
        return "PyYAML is not installed (pip install kubernetes-validate brings it)"
    if shutil.which("kubectl") is None:
        return ("kubectl is not installed (it renders deploy/k8s with its built-in kustomize; "
                "see .ci/run)")
    return None


@functools.cache
def rendered_text(variant: str) -> str:
    result = subprocess.run(["kubectl", "kustomize", str(VARIANTS[variant])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"kubectl kustomize {variant} failed:\n{result.stderr}"
    return result.stdout


@pytest.fixture(params=sorted(VARIANTS))
def variant(request: pytest.FixtureRequest) -> str:
    reason = kubectl_missing()
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def objects(variant: str) -> list[dict]:
    assert yaml is not None
    return [doc for doc in yaml.safe_load_all(rendered_text(variant)) if doc]


def only(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = [o for o in objects
             if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def loader(objects: list[dict]) -> dict:
    return only(objects, "StatefulSet", "batchfeed-loader")


def trainer_job(objects: list[dict]) -> dict:
    return only(objects, "Job", "batchfeed-trainer")


def container(workload: dict, name: str) -> dict:
    (c,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return c


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o["kind"] in WORKLOADS]


def flag(args: list[str], name: str) -> str | None:
    """The value of ``--name=value`` or ``--name value`` in a container's args."""
    for i, arg in enumerate(args):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(args):
            return args[i + 1]
    return None


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env", [])}


QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?$")
FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(q: str | int) -> float:
    """A Kubernetes quantity ("1748Mi", "4", "500m") as a number (bytes, cores)."""
    m = QUANTITY.match(str(q))
    assert m, f"not a quantity I can read: {q!r}"
    return float(m.group(1)) * FACTORS[m.group(2)]


def volumes_by_name(workload: dict) -> dict[str, dict]:
    return {v["name"]: v for v in workload["spec"]["template"]["spec"].get("volumes", [])}


def mounts(c: dict) -> dict[str, dict]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


def shard_count(sts: dict) -> int:
    """N: the replicas if the loaders are sharded, else 1 (every pod holds everything)."""
    args = container(sts, "loader")["args"]
    return sts["spec"]["replicas"] if flag(args, "--shard") is not None else 1


def shm_needed_bytes(sts: dict) -> int:
    """The formula's /dev/shm: the shard + the slot ring + the kept epoch orders + slack."""
    from batchfeed.server.order_board import KEEP
    from batchfeed.shared.plan import index_dtype

    annotations = sts["metadata"]["annotations"]
    data = int(annotations["batchfeed/data-mib"]) * MIB
    rows = int(annotations["batchfeed/data-rows"])
    args = container(sts, "loader")["args"]
    n = shard_count(sts)
    slots, slot_mb = flag(args, "--slots"), flag(args, "--slot-mb")
    assert slots is not None and slot_mb is not None, \
        "--slots and --slot-mb must be explicit: the sizing formula depends on them"
    orders = KEEP * rows * np.dtype(index_dtype(rows)).itemsize  # an order covers every row
    ring = int(slots) * int(float(slot_mb) * MIB)
    return math.ceil(data / n) + ring + orders + SLACK_MIB * MIB


# ---------------------------------------------------------------------------------------------
# The promises, on the rendered objects.


def test_dev_shm_holds_the_shard_the_ring_and_the_orders(objects: list[dict]):
    sts = loader(objects)
    c = container(sts, "loader")
    workers = flag(c["args"], "--workers")
    assert workers is not None and int(workers) >= 1, \
        "--workers must be explicit: the sizing formula depends on it"
    shm = mounts(c).get("/dev/shm")
    assert shm is not None, "no volume at /dev/shm: Docker-style 64 MiB would be all there is"
    empty_dir = volumes_by_name(sts)[shm["name"]].get("emptyDir")
    assert empty_dir is not None and empty_dir.get("medium") == "Memory", empty_dir
    needed = shm_needed_bytes(sts)
    assert quantity(empty_dir["sizeLimit"]) >= needed, (
        f"/dev/shm sizeLimit {empty_dir['sizeLimit']} < {needed / MIB:.0f} MiB needed for "
        f"1/{shard_count(sts)} of the data, the ring and the orders")


def test_memory_covers_dev_shm_and_every_server_process(objects: list[dict]):
    sts = loader(objects)
    c = container(sts, "loader")
    resources = c["resources"]
    workers = int(flag(c["args"], "--workers") or 0)
    shm = mounts(c)["/dev/shm"]
    size_limit = quantity(volumes_by_name(sts)[shm["name"]]["emptyDir"]["sizeLimit"])
    request = quantity(resources["requests"]["memory"])
    assert request >= size_limit + PROCESS_MIB * MIB * (workers + 1), (
        f"memory request {resources['requests']['memory']} does not cover /dev/shm "
        f"({size_limit / MIB:.0f} MiB, charged to the container) plus {PROCESS_MIB} MiB for "
        f"each of {workers + 1} processes")
    assert resources["limits"]["memory"] == resources["requests"]["memory"], \
        "the loader's memory limit should equal its request (it never grows past its ring)"
    assert quantity(resources["requests"]["cpu"]) >= workers


def test_probes_run_batchfeed_probe_over_curve_on_the_loader_port(objects: list[dict]):
    c = container(loader(objects), "loader")
    (port,) = [p["containerPort"] for p in c["ports"] if p["name"] == "batchfeed"]
    bind = flag(c["args"], "--bind")
    assert bind == f"tcp://0.0.0.0:{port}"
    volumes = volumes_by_name(loader(objects))
    secret_mounts = [path for path, m in mounts(c).items()
                     if m.get("readOnly") and "secret" in volumes[m["name"]]]
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = c[kind]["exec"]["command"]
        assert command[:3] == ["batchfeed", "probe", f"tcp://127.0.0.1:{port}"], command
        i = command.index("--curve")
        keys = command[i + 1:i + 3]
        assert len(keys) == 2 and all(
            any(k.startswith(p + "/") for p in secret_mounts) for k in keys), \
            f"{kind}: the probe's CURVE keys {keys} are not on a read-only mount"
        timeout = float(flag(command, "--timeout") or probe.DEFAULT_TIMEOUT)
        assert timeout < c[kind]["timeoutSeconds"], \
            f"{kind}: the probe's own --timeout must end before the kubelet gives up"


def test_no_pod_runs_privileged_or_as_root_or_writes_its_root(objects: list[dict]):
    for w in workloads(objects):
        pod = w["spec"]["template"]["spec"]
        pod_sc = pod.get("securityContext", {})
        assert pod.get("automountServiceAccountToken") is False, w["metadata"]["name"]
        assert pod.get("hostNetwork") is not True and pod.get("hostIPC") is not True
        assert pod.get("hostPID") is not True
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = {**pod_sc, **c.get("securityContext", {})}
            where = f"{w['kind']} {w['metadata']['name']} container {c['name']}"
            assert sc.get("privileged") is not True, where
            assert sc.get("runAsNonRoot") is True, where
            assert sc.get("runAsUser", 0) >= 10000, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            # With a read-only root, the places it writes are volumes of their own.
            tmp = mounts(c).get("/tmp")
            assert tmp is not None and "emptyDir" in volumes_by_name(w)[tmp["name"]], where


def test_only_trainer_pods_reach_the_loader_port(objects: list[dict]):
    sts = loader(objects)
    loader_labels = sts["spec"]["template"]["metadata"]["labels"]
    policies = [p for p in objects if p["kind"] == "NetworkPolicy" and
                p["spec"]["podSelector"].get("matchLabels", {}).items() <= loader_labels.items()
                and p["spec"]["podSelector"].get("matchLabels")]
    assert len(policies) == 1, "exactly one NetworkPolicy should select the loader pods"
    spec = policies[0]["spec"]
    assert "Ingress" in spec["policyTypes"]
    assert not spec["podSelector"].get("matchExpressions")
    key, value = TRAINER_LABEL
    assert spec["ingress"], "an empty ingress list would shut the trainers out too"
    for rule in spec["ingress"]:
        assert rule.get("from"), "a rule without `from` admits every pod and address"
        for peer in rule["from"]:
            assert set(peer) == {"podSelector"}, f"only pods may be admitted, not {peer}"
            assert peer["podSelector"] == {"matchLabels": {key: value}}, peer
        assert rule.get("ports") == [{"protocol": "TCP", "port": LOADER_PORT}], rule
    # The label admits the example trainer, and nothing else carries it.
    for w in workloads(objects):
        labels = w["spec"]["template"]["metadata"].get("labels", {})
        assert (labels.get(key) == value) == (w["kind"] == "Job"), w["metadata"]["name"]


def test_key_secrets_are_mounted_read_only(objects: list[dict]):
    seen = 0
    for w in workloads(objects):
        volumes = volumes_by_name(w)
        for c in w["spec"]["template"]["spec"]["containers"]:
            for m in c.get("volumeMounts", []):
                secret = volumes[m["name"]].get("secret")
                if secret is None:
                    continue
                seen += 1
                assert m.get("readOnly") is True, f"{c['name']}: {m['mountPath']} is writable"
                # Readable by the pod's user (through fsGroup), writable by nobody, not
                # readable by other users.
                mode = secret.get("defaultMode", 0o644)
                assert mode & 0o337 == 0, f"{m['mountPath']}: mode {mode:o} is too open"
    assert seen >= 3  # the server's keys, the authorized keys, the trainer's keys


def test_the_loaders_serve_from_the_headless_service(objects: list[dict]):
    sts = loader(objects)
    service = only(objects, "Service", sts["spec"]["serviceName"])
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= \
        sts["spec"]["template"]["metadata"]["labels"].items()
    assert [p["port"] for p in service["spec"]["ports"]] == [LOADER_PORT]


def test_each_loader_serves_the_shard_of_its_ordinal(variant: str, objects: list[dict]):
    sts = loader(objects)
    c = container(sts, "loader")
    env = env_of(c)
    shard = flag(c["args"], "--shard")
    replicas = sts["spec"]["replicas"]
    if variant == "replicas":
        assert shard is None and "SHARDS" not in env, "replicas hold the whole dataset"
    else:
        assert shard == "$(SHARD_INDEX)/$(SHARDS)"
        assert env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
            "metadata.labels['apps.kubernetes.io/pod-index']"
        assert env["SHARDS"]["value"] == str(replicas), "N of --shard I/N is not the replicas"
        assert replicas >= 2
    # The trainer waits for every loader, and its world size is its completions.
    job = trainer_job(objects)
    trainer_env = env_of(container(job, "trainer"))
    assert trainer_env["LOADERS"]["value"] == str(replicas)
    assert trainer_env["WORLD_SIZE"]["value"] == str(job["spec"]["completions"])
    assert job["spec"]["parallelism"] == job["spec"]["completions"]
    assert job["spec"]["completionMode"] == "Indexed"


def test_the_trainer_job_finds_the_loaders_with_resolve_all(objects: list[dict]):
    job = trainer_job(objects)
    c = container(job, "trainer")
    assert c["command"][:2] == ["python", "/app/job/trainer.py"]
    loaders = flag(c["args"], "--loaders")
    assert loaders == f"tcp://batchfeed-loaders.$(POD_NAMESPACE).svc:{LOADER_PORT}"
    job_mount = mounts(c)["/app/job"]
    config_map = volumes_by_name(job)[job_mount["name"]]["configMap"]["name"]
    script = only(objects, "ConfigMap", config_map)["data"]["trainer.py"]
    tree = ast.parse(script)
    called = {n.func.id for n in ast.walk(tree)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert {"resolve_all", "Client"} <= called
    assert script == (K8S / "base" / "trainer.py").read_text()


def test_images_are_set_with_kustomize_images(objects: list[dict]):
    for w in workloads(objects):
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c["image"].startswith("batchfeed:") or c["image"].startswith("batchfeed@"), \
                f"{c['name']}: {c['image']} does not come from the kustomization's images:"
            assert not c["image"].endswith(":latest")


# ---------------------------------------------------------------------------------------------
# Schemas (kubernetes-validate).


def schema_versions() -> list[str]:
    """The oldest version we support that the package ships (or its oldest, if newer), and
    the newest it ships."""
    from kubernetes_validate.utils import all_versions

    shipped = all_versions()

    def minor(v: str) -> tuple[int, int]:
        major, minor_, *_ = v.split(".")
        return int(major), int(minor_)

    supported = [v for v in shipped if minor(v) >= OLDEST_KUBERNETES] or shipped[-1:]
    return sorted({supported[0], shipped[-1]}, key=minor)


def test_manifests_match_the_kubernetes_schemas(objects: list[dict]):
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is not installed (see .ci/run)")
    for version in schema_versions():
        for obj in objects:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                raise AssertionError(
                    f"{obj['kind']} {obj['metadata']['name']} against Kubernetes {version}: "
                    f"{exc.message} at {'.'.join(map(str, exc.path))}") from None


def test_schema_validation_catches_a_misspelt_field():
    """The check above can fail: a field with a typo is refused (strict schemas)."""
    kv = pytest.importorskip("kubernetes_validate",
                             reason="kubernetes-validate is not installed (see .ci/run)")
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
               "spec": {"clusterIp": "None", "ports": [{"port": LOADER_PORT}]}}
    with pytest.raises(kv.ValidationError):
        kv.validate(service, schema_versions()[-1], strict=True)


# ---------------------------------------------------------------------------------------------
# checkov.


@pytest.mark.slow
def test_checkov_finds_no_failed_check_and_every_skip_has_its_reason(tmp_path: Path):
    reason = kubectl_missing()
    if reason:
        pytest.skip(reason)
    checkov = shutil.which("checkov")
    if checkov is None:
        pytest.skip("checkov is not installed (see .ci/run)")
    for name in VARIANTS:
        (tmp_path / f"{name}.yaml").write_text(rendered_text(name))
    # --skip-download and BC_SKIP_MAPPING: no call to the vendor's API; it all runs offline.
    result = subprocess.run(
        [checkov, "--directory", str(tmp_path), "--framework", "kubernetes", "--skip-download",
         "--output", "json"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "BC_SKIP_MAPPING": "TRUE"})
    assert result.stdout, f"checkov printed nothing (exit {result.returncode}):\n{result.stderr}"
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [(c["check_id"], c["file_path"], c["resource"], c["check_name"])
              for r in reports for c in r["results"]["failed_checks"]]
    assert not failed, f"checkov failed checks: {failed}"
    summary = [r["summary"] for r in reports]
    assert all(s["parsing_errors"] == 0 for s in summary), summary
    assert sum(s["passed"] for s in summary) > 0, summary
    for r in reports:
        for skipped in r["results"]["skipped_checks"]:
            why = (skipped.get("check_result") or {}).get("suppress_comment", "")
            assert why and why != "No comment provided", \
                f"{skipped['check_id']} on {skipped['resource']} is skipped without a reason"


# ---------------------------------------------------------------------------------------------
# batchfeed probe, against real servers.


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    """A server key pair and a probe key pair; the probe's public key is authorized."""
    directory = tmp_path / "keys"
    make_keys(str(directory), ("server", "probe", "stranger"))
    (directory / "authorized").mkdir()
    shutil.copy(directory / "probe.key", directory / "authorized" / "probe.key")
    return {name: str(directory / name) for name in
            ("server.key_secret", "server.key", "probe.key_secret", "stranger.key_secret",
             "authorized")}


def test_probe_exits_0_when_the_server_answers(serve: Callable[..., ServerProcess],
                                               dataset_path: Callable[..., Path],
                                               capsys: pytest.CaptureFixture[str]):
    srv = serve("--data", dataset_path(100), "--workers", 1)
    assert srv.address is not None
    assert probe.run(srv.address, timeout=5) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"batchfeed probe: ok: {srv.address} answered in "), out
    assert "1 workers" in out


def curve_server(serve: Callable[..., ServerProcess], data: Path,
                 keys: dict[str, str]) -> ServerProcess:
    """A server of ``data`` that admits only the authorized keys (as the StatefulSet runs)."""
    return serve("--data", data, "--workers", 1, "--curve-secret-key", keys["server.key_secret"],
                 "--authorized-keys", keys["authorized"])


def test_probe_over_curve_needs_authorized_keys(serve: Callable[..., ServerProcess],
                                               dataset_path: Callable[..., Path],
                                               keys: dict[str, str]):
    srv = curve_server(serve, dataset_path(100), keys)
    assert srv.address is not None
    assert probe.run(srv.address, 5, (keys["probe.key_secret"], keys["server.key"])) == 0
    assert probe.main([srv.address, "--timeout", "5",
                       "--curve", keys["probe.key_secret"], keys["server.key"]]) == 0
    # No keys, a key the server does not know, a key file that is not there: not healthy.
    assert probe.run(srv.address, 0.5) == 1
    assert probe.run(srv.address, 0.5, (keys["stranger.key_secret"], keys["server.key"])) == 1
    assert probe.run(srv.address, 0.5, (keys["authorized"] + "/nope", keys["server.key"])) == 1


def test_probe_exits_1_within_its_timeout_when_nothing_listens(
        capsys: pytest.CaptureFixture[str]):
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    assert probe.run(address, timeout=1.0) == 1
    assert time.monotonic() - started < 3.0
    err = capsys.readouterr().err
    assert err.startswith(f"batchfeed probe: failed: {address}: no answer"), err


def test_probe_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]):
    assert probe.run("http://127.0.0.1:5555", 1.0) == 1
    assert probe.run("tcp://127.0.0.1:5555", 0) == 1
    with pytest.raises(SystemExit) as exc:
        probe.main(["tcp://127.0.0.1:5555", "--curve", "only-one-file"])
    assert exc.value.code == 2


def test_batchfeed_probe_is_the_probe_command(serve: Callable[..., ServerProcess],
                                              dataset_path: Callable[..., Path]):
    """The manifests run `batchfeed probe ...`: the console command, as the kubelet would."""
    from batchfeed.cli import build_parser

    try:
        build_parser().parse_args(["probe", "tcp://127.0.0.1:5555"])
    except SystemExit:
        pytest.skip("`batchfeed probe` is not registered in batchfeed/cli.py yet")
    srv = serve("--data", dataset_path(100), "--workers", 1)
    assert srv.address is not None
    ok = subprocess.run([sys.executable, "-m", "batchfeed", "probe", srv.address,
                         "--timeout", "5"], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    down = subprocess.run([sys.executable, "-m", "batchfeed", "probe",
                           f"tcp://127.0.0.1:{free_port()}", "--timeout", "0.5"],
                          capture_output=True, text=True, timeout=60)
    assert down.returncode == 1, down


# ---------------------------------------------------------------------------------------------
# The example trainer, against a real server (as the Job runs it, minus the cluster's DNS).


def test_example_trainer_reads_every_row_over_curve(serve: Callable[..., ServerProcess],
                                                    dataset_path: Callable[..., Path],
                                                    keys: dict[str, str]):
    srv = curve_server(serve, dataset_path(1003), keys)
    assert srv.address is not None
    run = subprocess.run(
        [sys.executable, str(K8S / "base" / "trainer.py"), "--loaders", srv.address,
         "--min-loaders", "1", "--wait", "10", "--rank", "0", "--world-size", "1",
         "--epochs", "2", "--batch-size", "100",
         "--curve", keys["probe.key_secret"], keys["server.key"]],
        capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for epoch in (0, 1):
        assert f"rank 0/1: epoch {epoch}: 1,003 rows in " in run.stdout, run.stdout


def test_example_trainer_gives_up_when_too_few_loaders_resolve():
    run = subprocess.run(
        [sys.executable, str(K8S / "base" / "trainer.py"), "--loaders",
         f"tcp://127.0.0.1:{free_port()}", "--min-loaders", "2", "--wait", "0",
         "--rank", "0", "--world-size", "1"],
        capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert "fewer than 2 loaders" in run.stderr, run.stderr
