"""Rendered sbatch scripts and Kubernetes manifests: golden files for 1, 2 and 64 nodes plus
structural checks (ranks = nodes x GPUs, rendezvous, signal, requeue / restart on exit 75, resume
flag, no secret values even with credentials in the environment), strict offline validation, and a
typo that fails validation with the field named. Regenerate the golden files after an intended
change with DIFFDIS_UPDATE_GOLDEN=1."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster.env import expand_hostlist, read_dist_env
from cluster.k8s import K8sJob, ShardSpec, render_manifests, to_yaml
from cluster.k8s_validate import ManifestError, validate_manifest, validate_manifests
from cluster.slurm import SlurmJob, render_evaluator_sbatch, render_sbatch
from cluster.slurm_jobs import parse_scontrol
from pretrain.launch import node_layout

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "golden" / "cluster"
NODES = (1, 2, 64)
SECRETS = {"AWS_SECRET_ACCESS_KEY": "aws-s3cr3t-value", "HF_TOKEN": "hf_t0ken_value", "WANDB_API_KEY": "wandb-k3y"}


@pytest.fixture(autouse=True)
def credentials_in_environment(monkeypatch):
    """Every test renders with real-looking credentials in the environment: none may leak."""
    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)


def assert_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("DIFFDIS_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.is_file(), f"{path} missing: run with DIFFDIS_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{name} differs from its golden file (DIFFDIS_UPDATE_GOLDEN=1 after an intended change)"


def assert_no_secrets(text: str) -> None:
    for value in SECRETS.values():
        assert value not in text


# ---------------------------------------------------------------------------------------- Slurm

def slurm_job(nodes: int) -> SlurmJob:
    return SlurmJob(run_dir="/shared/runs/exp", config="/shared/diffdis/configs/tiny.yaml", overrides=["train.steps=1000"],
                    nodes=nodes, gpus_per_node=8, cpus_per_task=12, partition="gpu", time="24:00:00",
                    entry="diffdis", setup=["source /shared/diffdis/.venv/bin/activate"], env={"NCCL_DEBUG": "WARN"})


def sbatch_options(script: str) -> dict[str, str]:
    return dict(re.match(r"#SBATCH --([\w-]+)=?(.*)", line).groups() for line in script.splitlines()
                if line.startswith("#SBATCH"))


@pytest.mark.parametrize("nodes", NODES)
def test_sbatch_golden_and_structure(nodes):
    script = render_sbatch(slurm_job(nodes))
    assert_golden(f"slurm-{nodes}node.sbatch", script)
    options = sbatch_options(script)
    assert int(options["nodes"]) * int(options["ntasks-per-node"]) == nodes * 8 == slurm_job(nodes).world_size
    assert options["gpus-per-node"] == "8" and options["signal"] == "USR1@120" and "requeue" in options
    assert options["open-mode"] == "append" and options["output"] == "/shared/runs/exp/slurm/%x-%j.out"
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    assert "MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 10000 ))" in script
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert "--resume auto" in srun and "torchrun" not in script and "--nproc" not in srun  # one task per rank
    assert 'if [ "$code" -eq 75 ]; then' in script and 'scontrol requeue "$SLURM_JOB_ID"' in script
    assert_no_secrets(script)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell


def test_sbatch_without_requeue_and_cpu_nodes():
    script = render_sbatch(SlurmJob(run_dir="/r", nodes=1, gpus_per_node=0, tasks_per_node=2, cpus_per_task=1,
                                    requeue=False, entry="diffdis"))
    options = sbatch_options(script)
    assert "no-requeue" in options and "gpus-per-node" not in options and options["ntasks-per-node"] == "2"
    assert "scontrol requeue" not in script and "export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}" in script


@pytest.mark.parametrize(("fields", "named"), [
    ({"gpus_per_node": 0}, "tasks_per_node (--tasks-per-node)"),
    ({"gpus_per_node": 8, "tasks_per_node": 4}, "tasks_per_node (--tasks-per-node) = 4"),
    ({"nodes": 0}, "nodes (--nodes)"),
    ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "env.AWS_SECRET_ACCESS_KEY (--env)"),
])
def test_slurm_job_errors_name_the_field(fields, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        SlurmJob(run_dir="/r", **fields)


def test_hostlist_and_master_addr_from_slurm_variables():
    assert expand_hostlist("gpu[01-03,07],login1") == ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]
    assert expand_hostlist("n[8-10]-ib,vm") == ["n8-ib", "n9-ib", "n10-ib", "vm"]
    env = read_dist_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                         "SLURM_JOB_NODELIST": "gpu[07-08]", "MASTER_PORT": "21234"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port) == (9, 16, 1, "gpu07", 21234)
    assert read_dist_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a,b",
                          "MASTER_ADDR": "b", "MASTER_PORT": "1"}).master_addr == "b"  # the script's value wins


def test_parse_scontrol_one_line():
    line = ("JobId=42 JobName=exp UserId=root(0) JobState=PENDING Reason=BeginTime Dependency=(null) Requeue=1 "
            "Restarts=1 BatchFlag=1 ExitCode=0:0 NodeList=(null) StdOut=/runs/exp/slurm/exp-42.out Power=")
    fields = parse_scontrol(line)
    assert (fields["JobId"], fields["JobState"], fields["Restarts"], fields["StdOut"]) == (
        "42", "PENDING", "1", "/runs/exp/slurm/exp-42.out")


# ----------------------------------------------------------------------------------- Kubernetes

def k8s_job(nodes: int, operator: str = "trainjob", **fields) -> K8sJob:
    defaults = dict(env={"NCCL_DEBUG": "WARN"}, secret_env={"AWS_ACCESS_KEY_ID": "s3-creds/access-key",
                                                           "AWS_SECRET_ACCESS_KEY": "s3-creds/secret-key"},
                    overrides=["train.steps=1000"])
    return K8sJob(name="exp", image="registry.example.com/diffdis:0.1", run_dir="/data/runs/exp",
                  config="configs/tiny.yaml", nodes=nodes, gpus_per_node=8,
                  cpus_per_node=96, memory_per_node="512Gi", operator=operator, volume_claim="diffdis-runs",
                  **{**defaults, **fields})


def by_kind(manifests: list[dict]) -> dict[str, dict]:
    return {m["kind"]: m for m in manifests}


@pytest.mark.parametrize("nodes", NODES)
def test_trainjob_golden_structure_and_validation(nodes):
    manifests = render_manifests(k8s_job(nodes, shard=ShardSpec("digits", "/data/shards/digits")))
    text = to_yaml(manifests)
    assert_golden(f"k8s-trainjob-{nodes}node.yaml", text)
    assert list(yaml.safe_load_all(text)) == manifests
    validate_manifests(manifests)
    kinds = by_kind(manifests)
    assert list(kinds) == ["RayJob", "TrainingRuntime", "TrainJob", "Deployment", "Service"]
    trainer = kinds["TrainJob"]["spec"]["trainer"]
    assert trainer["numNodes"] * trainer["numProcPerNode"] == nodes * 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 8
    assert trainer["args"][:3] == ["train", "--nproc", "8"] and trainer["args"][-3:] == ["--resume", "auto", "train.steps=1000"]
    runtime = kinds["TrainingRuntime"]["spec"]
    assert kinds["TrainJob"]["spec"]["runtimeRef"]["name"] == kinds["TrainingRuntime"]["metadata"]["name"]
    assert runtime["mlPolicy"] == {"numNodes": nodes, "torch": {"numProcPerNode": 8}}
    job_spec = runtime["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]
    rules = job_spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onExitCodes": {"containerName": "node", "operator": "In", "values": [75]}}
    assert job_spec["backoffLimit"] == 3 and job_spec["template"]["spec"]["restartPolicy"] == "Never"
    assert job_spec["template"]["spec"]["terminationGracePeriodSeconds"] == 120
    # credentials only by reference
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in trainer["env"] if "valueFrom" in e}
    assert secret_refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-creds", "key": "secret-key"}
    assert_no_secrets(text)
    # TensorBoard reads the run's event files and is reachable inside the cluster only
    service = kinds["Service"]["spec"]
    assert service["type"] == "ClusterIP" and service["ports"][0]["port"] == 6006
    assert "/data/runs/exp/tensorboard" in kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert kinds["RayJob"]["spec"]["entrypoint"].endswith("shard digits /data/shards/digits --ray-address auto")


@pytest.mark.parametrize("nodes", NODES)
def test_pytorchjob_golden_structure_and_validation(nodes):
    manifests = render_manifests(k8s_job(nodes, operator="pytorchjob", tensorboard=False))
    text = to_yaml(manifests)
    assert_golden(f"k8s-pytorchjob-{nodes}node.yaml", text)
    validate_manifests(manifests)
    (job,) = manifests
    replicas = job["spec"]["pytorchReplicaSpecs"]
    pods = sum(r["replicas"] for r in replicas.values())
    assert pods == nodes and replicas["Master"]["replicas"] == 1 and int(job["spec"]["nprocPerNode"]) * pods == nodes * 8
    assert all(r["restartPolicy"] == "ExitCode" for r in replicas.values())
    assert job["spec"]["runPolicy"]["backoffLimit"] == 3
    assert_no_secrets(text)


@pytest.mark.parametrize(("entry", "expected"), [("exit 75", 143), ("exit 3", 3), ("exit 0", 0), ("exit 1", 1)])
def test_pytorchjob_wrapper_maps_only_75_to_retryable(entry, expected):
    """The container command of the PyTorchJob, run for real with sh: 75 → 143 (retried by the
    ExitCode policy), every other code unchanged (1-127: permanent)."""
    (job,) = render_manifests(k8s_job(1, operator="pytorchjob", tensorboard=False, entry=f"sh -c '{entry}'"))
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    assert subprocess.run(command, timeout=30).returncode == expected


def test_pytorchjob_wrapper_forwards_sigterm():
    trainer = "sh -c 'trap \"exit 75\" TERM; echo ready; while true; do sleep 0.1; done'"
    (job,) = render_manifests(k8s_job(1, operator="pytorchjob", tensorboard=False, entry=trainer))
    command = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["command"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 143  # the trainer got SIGTERM, exited 75, reported as retryable


@pytest.mark.parametrize(("kind", "mutate", "named"), [
    ("TrainJob", lambda m: m["spec"]["trainer"].update(numNode=2), "spec.trainer: Additional properties are not allowed ('numNode'"),
    ("TrainingRuntime", lambda m: m["spec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["podFailurePolicy"]
     ["rules"][0].update(acton="Ignore"), "replicatedJobs[0].template.spec.podFailurePolicy.rules[0]: Additional properties are not allowed ('acton'"),
    ("RayJob", lambda m: m["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(imagePullPolicyy="x"),
     "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0]: Additional properties are not allowed ('imagePullPolicyy'"),
    ("Deployment", lambda m: m["spec"].update(replica=2), "Deployment 'exp-tensorboard': spec: Additional properties are not allowed ('replica'"),
    ("Service", lambda m: m["spec"]["ports"][0].update(port="http"), "spec.ports[0].port: 'http' is not of type 'integer'"),
    ("TrainJob", lambda m: m["spec"]["trainer"].update(numNodes=0), "spec.trainer.numNodes: 0 is less than the minimum of 1"),
])
def test_typo_fails_validation_naming_the_field(kind, mutate, named):
    manifest = copy.deepcopy(by_kind(render_manifests(k8s_job(2, shard=ShardSpec("digits", "/s"))))[kind])
    validate_manifest(manifest)
    mutate(manifest)
    with pytest.raises(ManifestError, match=re.escape(named)):
        validate_manifest(manifest)


def test_k8s_job_refuses_inline_credentials():
    with pytest.raises(ValueError, match=re.escape("env.HF_TOKEN (--env): looks like a credential")):
        k8s_job(1, env={"HF_TOKEN": "x"})
    with pytest.raises(ValueError, match=re.escape("secret_env.AWS_SECRET_ACCESS_KEY (--secret-env)")):
        K8sJob(name="exp", image="i", run_dir="/r", secret_env={"AWS_SECRET_ACCESS_KEY": "no-slash"})


def test_node_layout_from_operator_variables():
    assert node_layout({}).nnodes == 1
    layout = node_layout({"PET_NNODES": "64", "PET_NODE_RANK": "63", "PET_MASTER_ADDR": "exp-node-0-0.exp",
                          "PET_MASTER_PORT": "29400", "PET_NPROC_PER_NODE": "8"})
    assert (layout.node_rank, layout.nnodes, layout.master_addr, layout.master_port) == (63, 64, "exp-node-0-0.exp", 29400)
    with pytest.raises(ValueError, match="PET_MASTER_ADDR"):
        node_layout({"PET_NNODES": "2", "PET_NODE_RANK": "1"})


# ------------------------------------------------------------------------------------------ CLI

def diffdis(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pretrain.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=120)


def test_cli_dry_runs_print_exactly_what_is_rendered(tmp_path):
    slurm = diffdis("submit", "slurm", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
                    "--config", "configs/tiny.yaml", "--out", str(tmp_path / "run"), "--entry", "diffdis",
                    "train.steps=10", "--dry-run")
    assert slurm.returncode == 0, slurm.stderr
    expected = render_sbatch(SlurmJob(run_dir=str(tmp_path / "run"), config=str(ROOT / "configs" / "tiny.yaml"),
                                      overrides=["train.steps=10"], nodes=2, gpus_per_node=8, partition="gpu", entry="diffdis"))
    assert slurm.stdout == expected and not (tmp_path / "run").exists()
    k8s = diffdis("submit", "k8s", "--image", "reg/diffdis:1", "--nodes", "2", "--out", "/data/runs/x", "--name", "x",
                  "--secret-env", "AWS_SECRET_ACCESS_KEY=s3-creds/secret-key", "--dry-run")
    assert k8s.returncode == 0, k8s.stderr
    manifests = list(yaml.safe_load_all(k8s.stdout))
    assert [m["kind"] for m in manifests] == ["TrainingRuntime", "TrainJob", "Deployment", "Service"]
    assert_no_secrets(slurm.stdout + k8s.stdout)
    bad = diffdis("submit", "k8s", "--image", "i", "--out", "/r", "--name", "Bad_Name", "--dry-run")
    assert bad.returncode == 2 and "name (--name) = 'Bad_Name'" in bad.stderr
    written = diffdis("submit", "k8s", "--image", "i", "--out", "/r", "--name", "w", "--write", str(tmp_path / "w.yaml"))
    assert written.returncode == 0 and "kubectl apply -f" in written.stdout and (tmp_path / "w.yaml").is_file()
    no_cluster = subprocess.run([sys.executable, "-m", "pretrain.cli", "submit", "k8s", "--image", "i", "--out", "/r",
                                 "--name", "a", "--write", str(tmp_path / "a.yaml"), "--apply"], cwd=ROOT, text=True,
                                capture_output=True, env={**os.environ, "KUBECONFIG": str(tmp_path / "none"),
                                                          "KUBERNETES_SERVICE_HOST": ""}, timeout=120)
    assert no_cluster.returncode == 1 and "--apply: no kubeconfig" in no_cluster.stderr
    assert (tmp_path / "a.yaml").is_file()  # rendered and kept even when it could not be applied


def test_apply_without_the_kubernetes_client_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util  # noqa: PLC0415

    from cluster import ClusterError  # noqa: PLC0415
    from cluster.k8s_apply import apply  # noqa: PLC0415

    if importlib.util.find_spec("kubernetes") is not None:
        pytest.skip("the kubernetes client is installed here; this checks the message when it is not")
    (tmp_path / "config").write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "config"))
    with pytest.raises(ClusterError, match=re.escape("pip install 'diffdis[k8s-apply]'")):
        apply(render_manifests(k8s_job(1)))
    help_text = diffdis("submit", "slurm", "--help").stdout
    assert "exit 75" in help_text and "--signal-grace" in help_text and "RUN/slurm/" in help_text


def test_ray_shard_sbatch_golden_and_structure():
    from cluster.slurm_ray import RayShardJob, render_ray_sbatch  # noqa: PLC0415

    script = render_ray_sbatch(RayShardJob(source="captions.parquet", output="s3://bucket/laion-64", log_dir="/shared/runs/sh/slurm",
                                           shard_args=["--config", "/shared/cfg/data.yaml", "image.size=64"], nodes=4,
                                           cpus_per_node=64, partition="cpu", bin_dir="/shared/venv/bin"))
    assert_golden("slurm-shard-4node.sbatch", script)
    options = sbatch_options(script)
    assert (options["nodes"], options["ntasks-per-node"], options["cpus-per-task"]) == ("4", "1", "64")
    assert "--head" in script and 'for node in "${nodes[@]:1}"' in script  # head on node 0, a worker on each other
    assert script.count("ray start") == 2 and '--ray-address "$head:$port"' in script
    assert "requeue" in options and "shard captions.parquet s3://bucket/laion-64" in script
    assert_no_secrets(script)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


@pytest.mark.parametrize("command", [["submit"], ["submit", "slurm"], ["submit", "slurm-shard"], ["submit", "k8s"], ["jobs"]])
def test_cluster_commands_explain_themselves(command, capsys):
    from pretrain.cli import main  # noqa: PLC0415

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and len(out) > 600
    assert "75" in out or command[-1] in ("jobs", "slurm-shard")  # the exit-code contract, where training is submitted


def test_jobs_errors_name_the_job(tmp_path, capsys):
    from pretrain.cli import main  # noqa: PLC0415

    assert main(["jobs", "status", str(tmp_path)]) == 2
    assert f"{str(tmp_path)!r} is neither a Slurm job id nor a run directory with slurm/job_id" in capsys.readouterr().err
    assert main(["jobs", "logs"]) == 2
    assert "JOB (a job id or run directory) is required" in capsys.readouterr().err


def test_evaluator_deployment_watches_the_trainers_checkpoints():
    job = k8s_job(2, evaluator=True, eval_suite="configs/eval/digits.yaml", eval_gpus=1,
                  overrides=["train.steps=1000", "train.checkpoint_dir=s3://bucket/exp/ckpts"])
    manifests = render_manifests(job)
    text = to_yaml(manifests)
    assert_golden("k8s-trainjob-evaluator-2node.yaml", text)
    validate_manifests(manifests)
    deployments = {m["metadata"]["name"]: m for m in manifests if m["kind"] == "Deployment"}
    container = deployments["exp-evaluator"]["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["diffdis", "evaluator", "watch", "s3://bucket/exp/ckpts", "--out", "/data/runs/exp/eval",
                                    "--suite", "configs/eval/digits.yaml"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s3-creds", "key": "secret-key"}}} in container["env"]
    board = deployments["exp-tensorboard"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "train:/data/runs/exp/tensorboard,eval:/data/runs/exp/eval/tensorboard" in board
    assert_no_secrets(text)


def test_slurm_evaluator_job_follows_the_training_job():
    job = slurm_job(2)
    job.overrides = [*job.overrides, "train.checkpoint_dir=s3://bucket/exp/ckpts"]
    script = render_evaluator_sbatch(job, "configs/eval/digits.yaml")
    assert_golden("slurm-evaluator-2node.sbatch", script)
    options = sbatch_options(script)
    assert options["nodes"] == "1" and options["ntasks"] == "1" and options["gpus"] == "1" and "requeue" in options
    assert options["output"] == "/shared/runs/exp/slurm/%x-%j.out" and options["job-name"] == "diffdis-eval"
    watch = "diffdis evaluator watch s3://bucket/exp/ckpts --out /shared/runs/exp/eval --device cuda --suite configs/eval/digits.yaml"
    lines = script.splitlines()
    assert f"{watch} &" in lines and f"{watch} --once" == lines[-1]  # beside training, then one final pass
    assert 'squeue -h -j "$DIFFDIS_TRAIN_JOB_ID" -t PD,R,S,CG,CF,RQ,RF,RH,RS' in script  # a requeued job still counts
    assert "srun" not in script and "train" not in watch
    assert_no_secrets(script)
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    cpu = render_evaluator_sbatch(SlurmJob(run_dir="/r", gpus_per_node=0, tasks_per_node=2, entry="diffdis"))
    assert "--gpus" not in cpu and "evaluator watch /r/checkpoints --out /r/eval --device cpu &" in cpu


def test_dry_run_with_evaluator_prints_both_scripts(tmp_path, capsys):
    from pretrain.cli import main  # noqa: PLC0415

    code = main(["submit", "slurm", "--config", "configs/tiny.yaml", "--out", str(tmp_path / "run"), "--nodes", "1",
                 "--gpus-per-node", "0", "--tasks-per-node", "2", "--evaluator", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and out.count("#!/bin/bash") == 2 and "evaluator.sbatch (submitted after the training job)" in out
    assert not (tmp_path / "run").exists()  # a dry run writes nothing
