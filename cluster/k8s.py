"""Render the Kubernetes manifests of a training job (plain dicts; YAML on output).

- trainer: a Kubeflow Trainer v2 ``TrainJob`` plus its own namespaced ``TrainingRuntime``, or a
  ``PyTorchJob`` (training operator v1) with ``operator="pytorchjob"``. One pod per node, which
  starts one rank per GPU with ``diffdis train --nproc G`` (pretrain/launch.py reads the node rank
  and rendezvous from the ``PET_*`` variables both operators set). Not torchrun: its agent turns a
  worker's exit 75 into 1.
- exit 75 (checkpointed after SIGTERM, e.g. the pod was evicted) restarts the pod without counting
  against the backoff limit, and ``--resume auto`` continues; other failures count. TrainJob: a
  ``podFailurePolicy`` on the runtime's Job (``Ignore`` on exit code 75 and on the
  ``DisruptionTarget`` condition). PyTorchJob has no pod failure policy; its ``ExitCode`` restart
  policy retries exit codes 128-255 and fails on 1-127, so the container maps 75 to 143 (what a
  SIGTERM death reports) with a small shell wrapper that forwards SIGTERM.
- data pipeline (optional): a KubeRay ``RayJob`` running ``diffdis shard ... --ray-address auto``.
- evaluator (optional): a ``Deployment`` running ``diffdis evaluator watch`` on the checkpoint URL.
- TensorBoard: a ``Deployment`` + cluster-internal ``Service`` reading RUN/tensorboard (and the
  evaluator's RUN/eval/tensorboard).
Credentials: only ``secretKeyRef`` references (env var name → Secret name/key); a value never
appears in a manifest, and ``env`` entries that look like credentials are refused.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from cluster import checkpoints_url
from cluster.preemption import REQUEUE_EXIT_CODE
from cluster.slurm import looks_secret

RETRYABLE_EXIT_CODE = 143  # 128 + SIGTERM: the training operator's ExitCode policy retries 128-255
RUNTIME_STEP_LABEL = "trainer.kubeflow.org/trainjob-ancestor-step"
NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
TENSORBOARD_PORT = 6006


@dataclass
class ShardSpec:
    """The data pipeline as a RayJob: ``diffdis shard SOURCE OUTPUT [ARGS]`` on a Ray cluster."""

    source: str
    output: str
    args: list[str] = field(default_factory=list)
    workers: int = 2
    cpus_per_worker: int = 8


@dataclass
class K8sJob:
    """Everything the manifests depend on. ``run_dir`` is a path inside the containers (the volume
    claim's mount) or an ``s3://`` URL; ``secret_env`` maps an env var name to ``"secret/key"``."""

    name: str
    image: str
    run_dir: str
    config: str | None = None
    overrides: list[str] = field(default_factory=list)
    namespace: str = "default"
    nodes: int = 1
    gpus_per_node: int = 8
    cpus_per_node: int | None = None
    memory_per_node: str | None = None  # e.g. "512Gi"
    operator: Literal["trainjob", "pytorchjob"] = "trainjob"
    backoff_limit: int = 3  # failures other than exit 75 before the job fails
    grace_s: int = 120  # terminationGracePeriodSeconds: one step plus a checkpoint after SIGTERM
    volume_claim: str | None = None  # PersistentVolumeClaim mounted at mount_path (shared run directory)
    mount_path: str = "/data"
    entry: str = "diffdis"  # the command inside the image
    env: dict[str, str] = field(default_factory=dict)
    secret_env: dict[str, str] = field(default_factory=dict)
    tensorboard: bool = True
    tensorboard_image: str | None = None  # default: the training image (TensorBoard is a dependency)
    evaluator: bool = False  # a Deployment running `diffdis evaluator watch` on the run's checkpoints
    eval_suite: str | None = None  # suite YAML inside the image (default: the evaluator's own default)
    eval_gpus: int = 0
    shard: ShardSpec | None = None

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name) or len(self.name) > 40:
            raise ValueError(f"name (--name) = {self.name!r}: lowercase letters, digits and '-', at most 40 characters "
                             "(it prefixes every object's name)")
        if self.nodes < 1 or self.gpus_per_node < 0:
            raise ValueError(f"nodes={self.nodes}, gpus_per_node={self.gpus_per_node}: need nodes >= 1, gpus >= 0")
        if self.operator not in ("trainjob", "pytorchjob"):
            raise ValueError(f"operator={self.operator!r}: 'trainjob' (Kubeflow Trainer v2) or 'pytorchjob'")
        for key in self.env:
            if looks_secret(key):
                raise ValueError(f"env.{key} (--env): looks like a credential; use --secret-env {key}=SECRET/KEY, "
                                 "which renders a reference to a Kubernetes Secret")
        for key, ref in self.secret_env.items():
            if ref.count("/") != 1 or not all(ref.split("/")):
                raise ValueError(f"secret_env.{key} (--secret-env) = {ref!r}: expected SECRET_NAME/KEY")

    @property
    def checkpoints_url(self) -> str:
        """Where the trainer writes checkpoints (:func:`cluster.checkpoints_url`)."""
        return checkpoints_url(self.run_dir, self.overrides)

    @property
    def eval_dir(self) -> str:
        return f"{self.run_dir.rstrip('/')}/eval"

    @property
    def procs_per_node(self) -> int:
        return max(1, self.gpus_per_node)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node


def _env(job: K8sJob) -> list[dict[str, Any]]:
    plain = [{"name": k, "value": v} for k, v in sorted(job.env.items())]
    secret = [{"name": k, "valueFrom": {"secretKeyRef": {"name": ref.split("/")[0], "key": ref.split("/")[1]}}}
              for k, ref in sorted(job.secret_env.items())]
    return plain + secret + [{"name": "PYTHONUNBUFFERED", "value": "1"}]


def train_args(job: K8sJob) -> list[str]:
    args = ["train", "--nproc", str(job.procs_per_node)]
    if job.config:
        args += ["--config", job.config]
    return args + ["--out", job.run_dir, "--resume", "auto", *job.overrides]


def _resources(job: K8sJob) -> dict[str, Any]:
    amounts: dict[str, Any] = {}
    if job.gpus_per_node:
        amounts["nvidia.com/gpu"] = job.gpus_per_node
    if job.cpus_per_node:
        amounts["cpu"] = job.cpus_per_node
    if job.memory_per_node:
        amounts["memory"] = job.memory_per_node
    return {"limits": amounts, "requests": dict(amounts)} if amounts else {}


def _volumes(job: K8sJob) -> tuple[list[dict], list[dict]]:
    """(pod volumes, container mounts): the shared run directory and a memory-backed /dev/shm
    (NCCL and DataLoader workers need more than the container runtime's 64 MB)."""
    volumes = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if job.volume_claim:
        volumes.append({"name": "runs", "persistentVolumeClaim": {"claimName": job.volume_claim}})
        mounts.append({"name": "runs", "mountPath": job.mount_path})
    return volumes, mounts


def _labels(job: K8sJob, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "diffdis", "app.kubernetes.io/instance": job.name,
            "app.kubernetes.io/component": component}


def _meta(job: K8sJob, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": job.namespace, "labels": _labels(job, component)}


def _pod_spec(job: K8sJob, container: dict[str, Any], restart: str) -> dict[str, Any]:
    volumes, mounts = _volumes(job)
    return {"restartPolicy": restart, "terminationGracePeriodSeconds": job.grace_s,
            "containers": [{**container, "volumeMounts": mounts}], "volumes": volumes}


def render_trainjob(job: K8sJob) -> list[dict[str, Any]]:
    """A ``TrainingRuntime`` (the Job template with the exit-75 policy) and the ``TrainJob`` using it."""
    runtime_name = f"{job.name}-runtime"
    container = {"name": "node", "image": job.image}
    job_spec = {
        "backoffLimit": job.backoff_limit,
        "podFailurePolicy": {"rules": [
            {"action": "Ignore", "onExitCodes": {"containerName": "node", "operator": "In", "values": [REQUEUE_EXIT_CODE]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]},
        "template": {"metadata": {"labels": _labels(job, "trainer")}, "spec": _pod_spec(job, container, "Never")},
    }
    runtime = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainingRuntime",
        "metadata": _meta(job, runtime_name, "trainer"),
        "spec": {
            "mlPolicy": {"numNodes": job.nodes, "torch": {"numProcPerNode": job.procs_per_node}},
            "template": {"spec": {"replicatedJobs": [{
                "name": "node", "replicas": 1,
                "template": {"metadata": {"labels": {RUNTIME_STEP_LABEL: "trainer"}}, "spec": job_spec},
            }]}},
        },
    }
    trainer = {"image": job.image, "command": shlex.split(job.entry), "args": train_args(job),
               "numNodes": job.nodes, "numProcPerNode": job.procs_per_node, "env": _env(job)}
    if _resources(job):
        trainer["resourcesPerNode"] = _resources(job)
    train_job = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": _meta(job, job.name, "trainer"),
        "spec": {"runtimeRef": {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime", "name": runtime_name},
                 "trainer": trainer},
    }
    return [runtime, train_job]


def _exit_code_wrapper(job: K8sJob) -> list[str]:
    """sh -c that runs the trainer, forwards SIGTERM to it, and reports exit 75 as 143 (retryable
    under the training operator's ExitCode policy); every other code unchanged."""
    command = " ".join(shlex.quote(p) for p in [*shlex.split(job.entry), *train_args(job)])
    script = ('export PET_NODE_RANK="${PET_NODE_RANK:-${RANK:-0}}"; '  # the operator's RANK is the pod's index
              f'trap \'kill -TERM "$pid" 2>/dev/null\' TERM; {command} & pid=$!; '
              'while true; do wait "$pid"; code=$?; kill -0 "$pid" 2>/dev/null || break; done; '
              f'[ "$code" -eq {REQUEUE_EXIT_CODE} ] && exit {RETRYABLE_EXIT_CODE}; exit "$code"')
    return ["/bin/sh", "-c", script]


def render_pytorchjob(job: K8sJob) -> list[dict[str, Any]]:
    container = {"name": "pytorch", "image": job.image, "command": _exit_code_wrapper(job), "env": _env(job)}
    if _resources(job):
        container["resources"] = _resources(job)
    pod = {"metadata": {"labels": _labels(job, "trainer")}, "spec": _pod_spec(job, container, "Never")}
    replicas = {"Master": {"replicas": 1, "restartPolicy": "ExitCode", "template": pod}}
    if job.nodes > 1:
        replicas["Worker"] = {"replicas": job.nodes - 1, "restartPolicy": "ExitCode", "template": pod}
    return [{
        "apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _meta(job, job.name, "trainer"),
        "spec": {"nprocPerNode": str(job.procs_per_node), "pytorchReplicaSpecs": replicas,
                 "runPolicy": {"backoffLimit": job.backoff_limit, "cleanPodPolicy": "None"}},
    }]


def render_rayjob(job: K8sJob, shard: ShardSpec) -> dict[str, Any]:
    entrypoint = " ".join(shlex.quote(p) for p in [*shlex.split(job.entry), "shard", shard.source, shard.output,
                                                    *shard.args, "--ray-address", "auto"])
    volumes, mounts = _volumes(job)

    def pod(name: str, cpus: int) -> dict[str, Any]:
        resources = {"limits": {"cpu": cpus}, "requests": {"cpu": cpus}}
        return {"metadata": {"labels": _labels(job, "data-pipeline")},
                "spec": {"containers": [{"name": name, "image": job.image, "env": _env(job), "resources": resources,
                                         "volumeMounts": mounts}], "volumes": volumes}}

    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(job, f"{job.name}-shard", "data-pipeline"),
        "spec": {
            "entrypoint": entrypoint, "shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600,
            "backoffLimit": job.backoff_limit,
            "rayClusterSpec": {
                "headGroupSpec": {"rayStartParams": {"num-cpus": "0"}, "template": pod("ray-head", 2)},
                "workerGroupSpecs": [{"groupName": "cpu", "replicas": shard.workers, "minReplicas": shard.workers,
                                      "maxReplicas": shard.workers, "rayStartParams": {},
                                      "template": pod("ray-worker", shard.cpus_per_worker)}],
            },
        },
    }


def render_evaluator(job: K8sJob) -> dict[str, Any]:
    """The evaluator service: every complete checkpoint evaluated once, in step order; restarted,
    it skips what it already did (pretrain/evaluator.py), so a plain Deployment fits."""
    labels = _labels(job, "evaluator")
    volumes, mounts = _volumes(job)
    command = [*shlex.split(job.entry), "evaluator", "watch", job.checkpoints_url, "--out", job.eval_dir]
    if job.eval_suite:
        command += ["--suite", job.eval_suite]
    container: dict[str, Any] = {"name": "evaluator", "image": job.image, "command": command, "env": _env(job),
                                 "volumeMounts": mounts}
    if job.eval_gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": job.eval_gpus}, "requests": {"nvidia.com/gpu": job.eval_gpus}}
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(job, f"{job.name}-evaluator", "evaluator"),
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {"containers": [container], "volumes": volumes}}},
    }


def render_tensorboard(job: K8sJob) -> list[dict[str, Any]]:
    labels = _labels(job, "tensorboard")
    volumes, mounts = _volumes(job)
    run = job.run_dir.rstrip("/")
    # with the evaluator, training and evaluation scalars side by side (what `diffdis dashboard` shows)
    logdir = (["--logdir_spec", f"train:{run}/tensorboard,eval:{job.eval_dir}/tensorboard"] if job.evaluator
              else ["--logdir", f"{run}/tensorboard"])
    container = {
        "name": "tensorboard", "image": job.tensorboard_image or job.image,
        "command": ["tensorboard", *logdir, "--host", "0.0.0.0", "--port", str(TENSORBOARD_PORT)],
        "ports": [{"name": "http", "containerPort": TENSORBOARD_PORT}],
        "env": [e for e in _env(job) if e["name"] != "PYTHONUNBUFFERED"],
        "volumeMounts": [m for m in mounts if m["name"] != "dshm"],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(job, f"{job.name}-tensorboard", "tensorboard"),
        "spec": {"replicas": 1, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels},
                              "spec": {"containers": [container], "volumes": [v for v in volumes if v["name"] != "dshm"]}}},
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(job, f"{job.name}-tensorboard", "tensorboard"),
        "spec": {"type": "ClusterIP", "selector": labels,
                 "ports": [{"name": "http", "port": TENSORBOARD_PORT, "targetPort": "http"}]},
    }
    return [deployment, service]


def render_manifests(job: K8sJob) -> list[dict[str, Any]]:
    manifests = render_trainjob(job) if job.operator == "trainjob" else render_pytorchjob(job)
    if job.shard:
        manifests.insert(0, render_rayjob(job, job.shard))
    if job.evaluator:
        manifests.append(render_evaluator(job))
    if job.tensorboard:
        manifests += render_tensorboard(job)
    return manifests


def to_yaml(manifests: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in rendering order (stable: golden files)."""
    return "".join("---\n" + yaml.safe_dump(m, sort_keys=False, default_flow_style=False) for m in manifests)
