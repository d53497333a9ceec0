"""Clusters: the launcher configs against Ray's own schema, the KubeRay manifest's structure, the
placement group's error, and a real `ray start --head` + `ray job submit` of a short training run."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import ray
import yaml

from k15 import procs

REPO = Path(__file__).resolve().parents[1]
GPU_CONF = yaml.safe_load((REPO / "conf" / "cluster" / "gpu.yaml").read_text())["cluster"]


def custom_resources(bundle: dict) -> set[str]:
    return {k for k in bundle if k not in ("CPU", "GPU", "memory")}


@pytest.mark.parametrize("name", ["aws.yaml", "gcp.yaml"])
def test_launcher_config_passes_rays_schema(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((REPO / "cluster" / name).read_text()))  # what `ray up` does first
    validate_config(config)  # Ray's ray-schema.json, and its checks of node types and worker counts
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"]["GPU"] == 0, "the head must not hold a GPU"
    workers = {n: t for n, t in types.items() if n != config["head_node_type"]}
    assert all(t["resources"]["GPU"] > 0 and 0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    offered = {r for t in workers.values() for r in t["resources"]}
    for key in ("trainer_resources", "rollout_resources"):  # conf/cluster/gpu.yaml's bundles can be placed
        assert custom_resources(GPU_CONF[key]) <= offered


def test_kuberay_rayjob_manifest_is_well_formed():
    job = yaml.safe_load((REPO / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("k15 train ") and "cluster=gpu" in spec["entrypoint"]
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]
    offered = set()
    for group in cluster["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        container = group["template"]["spec"]["containers"][0]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) > 0
        assert container["resources"]["requests"]["nvidia.com/gpu"] == container["resources"]["limits"]["nvidia.com/gpu"]
        offered |= set(json.loads(json.loads(group["rayStartParams"]["resources"])))
    for key in ("trainer_resources", "rollout_resources"):
        assert custom_resources(GPU_CONF[key]) <= offered


def test_a_placement_that_cannot_fit_names_what_it_asked_for():
    from omegaconf import OmegaConf

    from k15.cluster import Placement, PlacementError

    cfg = OmegaConf.create({"trainer_resources": {"CPU": 1}, "rollout_resources": {"CPU": 1, "GPU": 1},
                            "placement_strategy": "PACK", "placement_timeout_s": 2})
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        with pytest.raises(PlacementError, match=r"need 2 x \{'CPU': 1.0, 'GPU': 1.0\}"):
            Placement(cfg, 2)
        with pytest.raises(PlacementError, match="cluster.trainer_resources must ask for some resource"):
            Placement(OmegaConf.merge(cfg, {"trainer_resources": {"CPU": 0}}), 1)
        fits = Placement(OmegaConf.merge(cfg, {"rollout_resources": {"GPU": 0}}), 2)
        assert fits.rollout(1)["num_cpus"] == 1 and fits.rollout(1)["num_gpus"] == 0
        fits.remove()
    finally:
        ray.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_http(url: str, proc, timeout_s: float = 180) -> None:
    """Until `url` answers at all (an authentication error is an answer)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            assert proc.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, f"{url} did not answer in {timeout_s}s"
            time.sleep(0.5)


def job_status(ray_cli, address: str, env: dict) -> str:
    """SUCCEEDED, FAILED or STOPPED once `ray job status` reports the job ended, else ""."""
    proc = subprocess.run([*ray_cli, "job", "status", "--address", address, "k15-ci"], env=env, capture_output=True,
                          text=True, timeout=120)
    said = (proc.stdout + proc.stderr).lower()
    return next((end.upper() for end in ("succeeded", "failed", "stopped") if f"job 'k15-ci' {end}" in said), "")


@pytest.mark.slow
def test_ray_job_submit_runs_training_on_a_started_head(tmp_path, monkeypatch):
    import secrets

    # Token authentication, as a shared cluster should have it: the head, the CLI and the client share one.
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))
    bin_dir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RAY_ADDRESS")}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"  # the job's `k15` is this environment's
    dashboard = free_port()
    ray_cli = [sys.executable, "-m", "ray.scripts.scripts"]
    # A temp dir of its own (short: Ray's socket paths have a length limit), so that no other Ray
    # program here finds this head through /tmp/ray, and a session of its own, so that stopping it
    # touches nothing else (`ray stop` would stop every Ray on the machine).
    temp_dir = tempfile.mkdtemp(prefix="k15ray-", dir="/tmp")
    head = subprocess.Popen([*ray_cli, "start", "--head", "--block", f"--port={free_port()}", "--num-cpus=4",
                             "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                             "--disable-usage-stats", f"--temp-dir={temp_dir}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dashboard}"
        wait_for_http(f"{address}/api/version", head)
        run_dir = tmp_path / "run"
        submit = subprocess.run(
            [*ray_cli, "job", "submit", "--address", address, "--working-dir", ".", "--no-wait",
             "--runtime-env", "cluster/runtime_env.yaml",
             "--submission-id", "k15-ci", "--", "k15", "train", "logger=none", f"run_dir={run_dir}",
             "algo.num_iters=2", "algo.prompts_per_iter=4", "algo.samples_per_prompt=4", "trainer.warmup_steps=10",
             "data.train_size=100", "data.eval_size=8", "rollout.max_response_tokens=32", "eval_before=false"],
            env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert submit.returncode == 0, submit.stderr[-3000:]
        deadline = time.monotonic() + 600
        while (status := job_status(ray_cli, address, env)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            assert time.monotonic() < deadline, "the job did not finish in 10 minutes"
            time.sleep(1)
        logs = subprocess.run([*ray_cli, "job", "logs", "--address", address, "k15-ci"], env=env,
                              capture_output=True, text=True, timeout=120).stdout
        assert status == "SUCCEEDED", logs[-4000:]
        assert "joined the Ray cluster" in logs
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["iter"] for r in records if "reward" in r] == [1, 2]
        assert [r for r in records if r.get("summary")][0]["trained_samples"] == 2 * 4 * 4
    finally:
        procs.kill_session(head.pid)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)
