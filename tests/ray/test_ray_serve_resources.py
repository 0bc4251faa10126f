"""What the Ray Serve app asks Ray for, fitted to a cluster and checked, without a cluster."""

from __future__ import annotations

import pytest

from tessellm.entrypoints.ray_serve.config import parse_config
from tessellm.entrypoints.ray_serve.resources import (ClusterView, ResourceShortfall, check_fit, describe,
                                                      fit_defaults)

TWO_CPUS = ClusterView(free={"CPU": 2.0}, nodes=[{"CPU": 2.0}])


def _fitted(args: dict, cluster: ClusterView):
    cfg = parse_config(args)
    fit_defaults(cfg, cluster)
    return cfg


def test_defaults_fit_two_replicas_on_two_cpus():
    cfg = _fitted({"engine": {"device": "cpu"}, "num_replicas": 2}, TWO_CPUS)
    assert describe(cfg) == "2 replica(s) x {CPU: 0.9} + 1 ingress x {CPU: 0.2}"
    check_fit(cfg, TWO_CPUS)


def test_defaults_on_a_big_machine_are_one_cpu_and_half_a_cpu():
    big = ClusterView(free={"CPU": 64.0, "GPU": 8.0}, nodes=[{"CPU": 64.0, "GPU": 8.0}])
    cfg = _fitted({"engine": {"device": "cuda", "tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                   "num_replicas": 2}, big)
    assert describe(cfg) == "2 replica(s) x {CPU: 1, GPU: 4} + 1 ingress x {CPU: 0.5}"
    check_fit(cfg, big)


def test_autoscaling_shares_the_cpus_among_its_most_replicas():
    cfg = _fitted({"engine": {"device": "cpu"},
                   "autoscaling": {"min_replicas": 1, "max_replicas": 4}}, TWO_CPUS)
    assert cfg.replica.num_cpus == 0.45
    check_fit(cfg, TWO_CPUS)


@pytest.mark.parametrize("args,cluster,message", [
    ({"engine": {"device": "cpu"}, "num_replicas": 3, "replica": {"num_cpus": 1}}, TWO_CPUS,
     "The Ray cluster has 2 CPU free, but 3 engine replica(s) x 1 CPU + 1 ingress x 0.2 CPU need 3.2 CPU; "
     "lower --num-replicas or --replica-num-cpus"),
    ({"engine": {"device": "cuda", "tensor_parallel_size": 2}}, ClusterView(
        free={"CPU": 16.0, "GPU": 2.0}, nodes=[{"CPU": 8.0, "GPU": 1.0}] * 2),
     "One engine replica needs 2 GPU on one node, but the largest node of the Ray cluster has 1; "
     "lower --tensor-parallel-size x --pipeline-parallel-size"),
    ({"engine": {"device": "cuda"}, "num_replicas": 2}, ClusterView(free={"CPU": 8.0}, nodes=[{"CPU": 8.0}]),
     "One engine replica needs 1 GPU on one node, but the largest node of the Ray cluster has 0"),
    ({"engine": {"device": "tpu"}, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
     ClusterView(free={"CPU": 8.0, "TPU": 1.0}, nodes=[{"CPU": 8.0, "TPU": 4.0}]),
     "The Ray cluster has 1 TPU free, but 2 engine replica(s) x 1 TPU need 2 TPU; lower --min-replicas"),
])
def test_a_shortfall_is_one_sentence_naming_it_and_the_flag(args, cluster, message):
    cfg = _fitted(args, cluster)
    with pytest.raises(ResourceShortfall) as info:
        check_fit(cfg, cluster)
    assert str(info.value).startswith(message)
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")


def test_negative_cpus_are_refused():
    with pytest.raises(ValueError, match="replica.num_cpus must be >= 0"):
        parse_config({"engine": {"device": "cpu"}, "replica": {"num_cpus": -1}})
