"""Where k15's actors run: join a Ray cluster (or start a local one) and reserve the rollout actors'
resources in one placement group, by the bundles in conf/cluster/. The trainer's workers are placed
by Ray Train (k15/trainer/group.py) with cluster.trainer_resources each.

On an autoscaling cluster the placement groups are what ask for nodes: their bundles (e.g. one GPU
and a `rollout_node` resource per rollout actor) make the autoscaler start workers of the matching
node types (cluster/aws.yaml, cluster/gcp.yaml, cluster/kuberay-rayjob.yaml).
"""

from __future__ import annotations

import os

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from k15.metrics import console


class PlacementError(RuntimeError):
    """The cluster cannot hold the actors' bundles; the message says what was asked and what is there."""


def init_ray(cluster_cfg, cpus_needed: int) -> None:
    """Join the cluster at cluster.address (`auto`: the one `ray start` started on this machine) or
    at RAY_ADDRESS (set inside a Ray job), else start a local Ray of our own. Not joining by default
    keeps two runs on one machine from sharing (and stopping) each other's Ray."""
    if ray.is_initialized():
        return
    address = cluster_cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        console.print(f"joined the Ray cluster at {ray.get_runtime_context().gcs_address}")
        return
    num_cpus = cluster_cfg.num_cpus or max(os.cpu_count() or 1, cpus_needed)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True,
             runtime_env={"worker_process_setup_hook": quiet_placement_group_cleaner})


def quiet_placement_group_cleaner() -> None:
    """Ray Train's placement-group cleaner asks the state API (served by the dashboard, which a
    local k15 Ray does not start) about its controller every second, and warns each time it cannot."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


class Placement:
    """One placement group with a bundle per rollout actor; the trainer workers' resources are
    checked here too, and Ray Train reserves them."""

    def __init__(self, cluster_cfg, num_rollouts: int):
        self.trainer_bundle = _bundle(cluster_cfg.trainer_resources, "cluster.trainer_resources")
        self.rollout_bundle = _bundle(cluster_cfg.rollout_resources, "cluster.rollout_resources")
        bundles = [self.rollout_bundle] * num_rollouts
        self.group = placement_group(bundles, strategy=cluster_cfg.placement_strategy, name="")
        try:
            ray.get(self.group.ready(), timeout=cluster_cfg.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(self.group)
            raise PlacementError(
                f"the cluster could not place the rollout actors within {cluster_cfg.placement_timeout_s}s: they "
                f"need {num_rollouts} x {self.rollout_bundle} "
                f"({cluster_cfg.placement_strategy}); the cluster has {ray.cluster_resources()}") from None

    def rollout(self, index: int) -> dict:
        return _options(self.rollout_bundle, self.group, index)

    def remove(self) -> None:
        ray.util.remove_placement_group(self.group)


def _bundle(resources, key: str) -> dict[str, float]:
    bundle = {str(k): float(v) for k, v in dict(resources).items() if float(v) > 0}
    if not bundle:
        raise PlacementError(f"{key} must ask for some resource, e.g. {{CPU: 1}}")
    return bundle


def _options(bundle: dict, group, index: int) -> dict:
    """Ray actor options that take exactly the bundle's resources, inside the bundle."""
    custom = {k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")}
    return {"num_cpus": bundle.get("CPU", 0), "num_gpus": bundle.get("GPU", 0), "resources": custom,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}
