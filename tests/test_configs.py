"""The shipped cluster configs parse and name the entrypoint and fields the job relies on.

The Kubernetes CronJob is validated against the Kubernetes schemas kubernetes-validate
bundles (offline, strict: unknown fields fail). No PyPI package carries KubeRay's CRD
schemas, so for RayJob and RayCronJob the fields ratefit depends on are checked directly."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

import ratefit.cluster
from ratefit.jobs.spec import JobSpec

CONFIGS = Path(ratefit.cluster.__file__).parent / "configs"


def load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def test_example_job_spec_is_a_valid_spec():
    spec = JobSpec.from_dict(load("job.example.yaml"))
    assert spec.codec == "avif" and spec.target_bpp == 0.5 and spec.input.startswith("s3://")


def test_rayjob_runs_the_recompress_entrypoint():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["entrypoint"].startswith("python -m ratefit.jobs.recompress --spec ")
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_raycronjob_wraps_the_same_job_nightly():
    cron = load("raycronjob.yaml")
    assert cron["kind"] == "RayCronJob" and len(cron["spec"]["schedule"].split()) == 5
    template = cron["spec"]["jobTemplate"]
    assert template["entrypoint"].startswith("python -m ratefit.jobs.recompress --spec ")
    assert "rayClusterSpec" in template


def test_kubernetes_cronjob_and_launcher_config_parse():
    cron = load("cronjob.yaml")
    assert cron["kind"] == "CronJob" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    launcher = load("ray-cluster.yaml")
    assert launcher["head_node_type"] in launcher["available_node_types"]
    assert any("ratefit" in c for c in launcher["setup_commands"])


def test_kubernetes_cronjob_validates_against_the_bundled_schemas():
    import kubernetes_validate

    cron = load("cronjob.yaml")
    kubernetes_validate.validate(cron, "1.31", strict=True)
    broken = copy.deepcopy(cron)
    broken["spec"]["jobTemplate"]["spec"]["template"]["spec"]["restartPolicy"] = 3   # not a string
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)
    broken = copy.deepcopy(cron)
    broken["spec"]["schedul"] = broken["spec"].pop("schedule")                        # a misspelt field
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.31", strict=True)


def test_nightly_spec_is_an_incremental_retiring_job():
    spec = JobSpec.from_dict(load("nightly.example.yaml"))
    assert spec.input.startswith("s3://") and spec.output.startswith("s3://")
    assert spec.retire_originals and spec.verify and spec.retire_to.startswith("s3://")
    cron = load("raycronjob.yaml")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"   # two runs at once would plan the same inputs
