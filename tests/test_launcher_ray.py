"""The launcher against a real Ray: a port that answers but is not Ray fails within
connect_timeout_s in one line; the probe joins a live cluster; the live-cluster resource check
names what is missing; and the private Ray API the autoscaler ceiling comes from is still there."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import launcher
from bench.cli import main
from bench.clusterprobe import PROBE_IMPORT_LIMIT_S, probe
from bench.config import ClusterConfig
from bench.errors import LauncherError
from conftest import TINY_SWEEP, write_yaml

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def http_server():
    """`python -m http.server` on a free local port: open, answering, and not Ray."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("http.server did not start")
                time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait()


def test_a_port_that_is_not_ray_fails_in_one_line_within_the_timeout(http_server, tmp_path: Path, capfd, monkeypatch):
    """Issue 14 item 8: ray.init on an HTTP server's port hung for more than 400 s printing Ray's
    C++ warnings. capfd: the warnings went to the process's stderr, below Python."""
    monkeypatch.setattr(launcher, "_ray_connected", lambda: False)  # as in a fresh CLI process
    cluster = write_yaml(tmp_path / "c.yaml", f"name: web\naddress: {http_server}\nconnect_timeout_s: 3\n")
    sweep = write_yaml(tmp_path / "s.yaml", TINY_SWEEP)
    t0 = time.monotonic()
    code = main(["run", str(sweep), "--cluster", str(cluster), "--results-dir", str(tmp_path / "r")])
    elapsed_s = time.monotonic() - t0
    out, err = capfd.readouterr()
    assert code == 1 and elapsed_s < 3 + PROBE_IMPORT_LIMIT_S  # a bound on the hang, not a speed figure
    assert err.strip().splitlines() == [
        f"batchscale: error: {http_server} accepts connections but no Ray cluster answered there within 3 s "
        "(is it the GCS port of `ray start --head`, 6379 by default, with the same Ray version? raise "
        "connect_timeout_s for a slow head)"], err
    assert not (tmp_path / "r").exists()  # nothing written


def test_the_probe_joins_a_live_cluster(ray_session):
    probe(ray_session.get_runtime_context().gcs_address, timeout_s=120)  # returns: joined and left


@pytest.mark.parametrize("cluster, expect", [
    (ClusterConfig(name="c", resources_per_worker={"CPU": 1, "foo": 1}), "has no 'foo' resource at all"),
    # TPU is refused at validation now; another resource the cluster lacks:
    (ClusterConfig(name="c", resources_per_worker={"CPU": 1, "bigmem": 1}), "has no 'bigmem' resource at all"),
    (ClusterConfig(name="c", resources_per_worker={"CPU": 3}), "2 workers x 3 CPU = 6 CPU, but the Ray cluster has 4 CPU"),
], ids=["custom", "other", "cpus"])
def test_the_live_cluster_check_names_the_missing_resource(ray_session, cluster, expect):
    assert ray_session.cluster_resources().get("CPU") == 4  # tests/conftest.py's session Ray
    with pytest.raises(LauncherError, match="^cluster 'c': cannot start 2 workers: ") as err:
        launcher.connect(cluster, max_workers=2)  # joined already: only the check runs
    assert expect in str(err.value)
    launcher.connect(ClusterConfig(name="c"), max_workers=2)  # 2 x 1 CPU fits


def test_the_autoscaler_ceiling_comes_from_rays_private_state_api(ray_session):
    """Pins the one private API the resource check reads (Ray 2.60): if Ray moves it, this fails
    (production then falls back to the live nodes). A local Ray publishes no node types."""
    from ray._private.state import state

    assert callable(state.get_max_resources_from_cluster_config)
    assert state.get_max_resources_from_cluster_config() is None
    assert launcher.autoscaler_max_resources() is None
