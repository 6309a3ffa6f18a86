from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from blsp_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]


def test_cluster_yaml_passes_rays_own_validation():
    cfg = load_config(REPO / "configs" / "blsp-7b.yaml")
    launcher = yaml.safe_load((REPO / cfg.cluster.cluster_file).read_text())
    prepared = prepare_config(launcher)
    validate_config(prepared)  # raises jsonschema.ValidationError / ValueError when invalid
    workers = prepared["available_node_types"]["a100"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 1  # elastic: autoscaler adds nodes


def test_kuberay_manifest_has_the_same_shape():
    launcher = yaml.safe_load((REPO / "configs" / "cluster.yaml").read_text())
    kuberay = yaml.safe_load((REPO / "configs" / "kuberay-cluster.yaml").read_text())
    assert kuberay["kind"] == "RayCluster" and kuberay["spec"]["enableInTreeAutoscaling"]
    (group,) = kuberay["spec"]["workerGroupSpecs"]
    assert group["maxReplicas"] == launcher["available_node_types"]["a100"]["max_workers"]
    assert group["minReplicas"] == launcher["available_node_types"]["a100"]["min_workers"]
    assert kuberay["spec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
