"""``diffdis submit slurm|k8s`` and ``diffdis jobs status|cancel|logs``: from a login node to a job.

The renderers live in ``cluster/`` (pure functions of typed job configs); this module turns
command-line options into those configs, checks the training config before anything is submitted,
and prints what was written and where it will run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUBMIT_DESCRIPTION = """\
Submit a training job to a cluster. The trainer runs one rank per GPU, resumes with --resume auto,
and on a preemption signal (SIGUSR1 before the time limit, SIGTERM) checkpoints and exits 75, which
the job turns into a requeue (Slurm) or a pod restart (Kubernetes); any other failure is final.

  slurm        renders RUN/slurm/train.sbatch and submits it with sbatch (--dry-run: print it only)
  slurm-shard  the data pipeline: Ray head + workers started with srun, then diffdis shard
  k8s          renders Kubernetes manifests (--write FILE), validates them offline, and with --apply
               creates them with the kubernetes client (needs a kubeconfig)
"""

SLURM_EPILOG = """\
Examples:
  diffdis submit slurm --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00 \\
      --config configs/tiny.yaml --out /shared/runs/exp1 train.steps=100000 --dry-run
  diffdis submit slurm --nodes 1 --gpus-per-node 0 --tasks-per-node 2 --config configs/tiny.yaml --out runs/cpu
Then: diffdis jobs status /shared/runs/exp1, diffdis jobs logs /shared/runs/exp1.
Logs: RUN/slurm/<name>-<jobid>.out (appended across requeues); checkpoints: RUN/checkpoints;
TensorBoard: RUN/tensorboard; metrics: RUN/metrics.jsonl.
"""

JOBS_DESCRIPTION = """\
Look after Slurm jobs submitted by `diffdis submit slurm`. JOB is a job id or the run directory
(RUN/slurm/job_id is written at submission).
  status JOB   state, restarts (requeues), exit code, log path; --json for one JSON object
  status       the queue (squeue)
  logs JOB     the last lines of the job's log (-n N; 0 = all)
  cancel JOB   scancel; --signal USR1 instead asks the job to checkpoint and requeue itself
"""


def _slurm_job_from_args(args: argparse.Namespace):
    from cluster.slurm import SlurmJob, default_entry  # noqa: PLC0415

    return SlurmJob(
        run_dir=str(Path(args.out).resolve()), config=str(Path(args.config).resolve()) if args.config else None,
        overrides=list(args.overrides), name=args.name, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
        account=args.account, time=args.time, signal_grace_s=args.signal_grace,
        requeue=not args.no_requeue, entry=args.entry or default_entry(), setup=list(args.setup or []),
        env=dict(_parse_env(args.env or [])), extra_sbatch=list(args.sbatch or []))


def _parse_env(items: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--env {item!r}: expected NAME=VALUE")
        pairs.append((key, value))
    return pairs


def _check_training_config(args: argparse.Namespace) -> None:
    """A bad config or override fails here, on the login node, not minutes later in the queue."""
    from pretrain.config import load_run_config  # noqa: PLC0415

    load_run_config(args.config, args.overrides)


def cmd_submit_slurm(args: argparse.Namespace) -> int:
    from cluster.slurm import (  # noqa: PLC0415
        EVALUATOR_SCRIPT_NAME, TRAIN_JOB_VARIABLE, render_evaluator_sbatch, render_sbatch, sbatch, write_evaluator_script,
        write_script,
    )
    from cluster.slurm_jobs import JOB_ID_FILE  # noqa: PLC0415

    job = _slurm_job_from_args(args)
    _check_training_config(args)
    if args.dry_run:
        print(render_sbatch(job), end="")
        if args.evaluator:
            print(f"# ---- {job.slurm_dir / EVALUATOR_SCRIPT_NAME} (submitted after the training job)")
            print(render_evaluator_sbatch(job, args.eval_suite), end="")
        return 0
    script = write_script(job)
    job_id = sbatch(script)
    (job.slurm_dir / JOB_ID_FILE).write_text(job_id + "\n")
    print(f"submitted Slurm job {job_id}: {job.world_size} ranks ({job.nodes} node(s) x {job.tasks_per_node})")
    if args.evaluator:
        eval_id = sbatch(write_evaluator_script(job, args.eval_suite), export={TRAIN_JOB_VARIABLE: job_id})
        print(f"submitted evaluator job {eval_id}: watches the checkpoints while job {job_id} is queued or running; "
              f"results in {job.run_dir}/eval")
    print(f"  script     : {script}\n  log        : {job.slurm_dir}/{job.name}-{job_id}.out")
    print(f"  checkpoints: {job.run_dir}/checkpoints\n  tensorboard: tensorboard --logdir {job.run_dir}/tensorboard")
    print(f"  status     : diffdis jobs status {job.run_dir}")
    return 0


def cmd_submit_slurm_shard(args: argparse.Namespace) -> int:
    from cluster.slurm import sbatch  # noqa: PLC0415
    from cluster.slurm_jobs import JOB_ID_FILE  # noqa: PLC0415
    from cluster.slurm_ray import RayShardJob, default_bin_dir, render_ray_sbatch, write_script  # noqa: PLC0415

    run_dir = Path(args.run_dir or Path("runs") / args.name).resolve()
    shard_args = (["--config", str(Path(args.shard_config).resolve())] if args.shard_config else []) + list(args.overrides)
    local_output = "://" not in args.output
    job = RayShardJob(source=args.source, output=str(Path(args.output).resolve()) if local_output else args.output,
                      log_dir=str(run_dir / "slurm"), shard_args=shard_args, name=args.name, nodes=args.nodes,
                      cpus_per_node=args.cpus_per_node, partition=args.partition, account=args.account, time=args.time,
                      bin_dir=args.bin_dir or default_bin_dir(), setup=list(args.setup or []))
    if args.dry_run:
        print(render_ray_sbatch(job), end="")
        return 0
    script = write_script(job)
    job_id = sbatch(script)
    (run_dir / "slurm" / JOB_ID_FILE).write_text(job_id + "\n")
    print(f"submitted Slurm job {job_id}: Ray on {job.nodes} node(s) x {job.cpus_per_node} CPUs, diffdis shard -> {job.output}")
    print(f"  script: {script}\n  log   : {job.log_dir}/{job.name}-{job_id}.out\n  status: diffdis jobs status {run_dir}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    from cluster import slurm_jobs  # noqa: PLC0415

    if args.action == "status" and args.job is None:
        print(slurm_jobs.queue(), end="")
        return 0
    if args.job is None:
        raise ValueError(f"jobs {args.action}: JOB (a job id or run directory) is required")
    job_id = slurm_jobs.resolve_job_id(args.job)
    if args.action == "status":
        status = slurm_jobs.job_status(job_id)
        if args.json:
            print(status.to_json())
        else:
            for key, value in vars(status).items():
                print(f"{key:>10}: {value}")
    elif args.action == "cancel":
        slurm_jobs.cancel(job_id, args.signal)
        print(f"sent {args.signal} to job {job_id}" if args.signal else f"cancelled job {job_id}")
    else:
        path, text = slurm_jobs.log_tail(job_id, args.lines)
        print(f"==> {path} <==\n{text}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    submit = sub.add_parser("submit", help="submit a training job to Slurm or Kubernetes", formatter_class=fmt,
                            description=SUBMIT_DESCRIPTION)
    targets = submit.add_subparsers(dest="target", required=True, metavar="TARGET")

    slurm = targets.add_parser("slurm", help="render and sbatch a training job", formatter_class=fmt,
                               epilog=SLURM_EPILOG, description="Render RUN/slurm/train.sbatch (one srun task per GPU, "
                               "ranks from Slurm's variables, MASTER_ADDR = first node, --signal=USR1@GRACE, "
                               "--requeue; exit 75 → scontrol requeue → --resume auto) and submit it.")
    _add_training_args(slurm)
    slurm.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    slurm.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node = ranks per node (default 8; "
                       "0 for CPU nodes, then --tasks-per-node)")
    slurm.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node on CPU nodes")
    slurm.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (sets OMP_NUM_THREADS)")
    slurm.add_argument("--partition", default=None)
    slurm.add_argument("--account", default=None)
    slurm.add_argument("--time", default=None, help="time limit, e.g. 24:00:00 (default: the partition's)")
    slurm.add_argument("--signal-grace", type=int, default=120, metavar="SECONDS",
                       help="SIGUSR1 this long before the time limit: one step plus a checkpoint must fit (default 120)")
    slurm.add_argument("--no-requeue", action="store_true", help="exit 75 ends the job instead of requeueing it")
    slurm.add_argument("--entry", default=None, help="command that runs diffdis on the compute nodes "
                       "(default: this Python with -m pretrain.cli)")
    slurm.add_argument("--setup", action="append", metavar="LINE", help="shell line before srun, e.g. 'module load cuda' "
                       "(repeatable)")
    slurm.add_argument("--env", action="append", metavar="NAME=VALUE", help="non-secret variable for every rank "
                       "(repeatable); secrets travel in the submitting environment, which sbatch exports")
    slurm.add_argument("--sbatch", action="append", metavar="OPTION", help="extra #SBATCH option, e.g. --exclusive")
    slurm.add_argument("--evaluator", action="store_true", help="also submit RUN/slurm/evaluator.sbatch: one task (1 GPU "
                       "on GPU nodes) running `diffdis evaluator watch` on the run's checkpoints while the training "
                       "job is queued or running, then a final --once pass; results in RUN/eval")
    slurm.add_argument("--eval-suite", default=None, metavar="FILE", help="suite YAML for --evaluator "
                       "(default: the evaluator's, configs/eval/digits.yaml)")
    slurm.set_defaults(func=cmd_submit_slurm)

    ray = targets.add_parser("slurm-shard", help="the data pipeline (diffdis shard) on a Ray cluster inside a Slurm job",
                             formatter_class=fmt, description="Render RUN/slurm/shard.sbatch: a Ray head on the first node, "
                             "a Ray worker on every other node (srun), then `diffdis shard SOURCE OUTPUT --ray-address "
                             "HEAD:PORT`; submit it with sbatch. Requeued after a preemption, diffdis shard resumes "
                             "(writes only the missing shards).",
                             epilog="Example:\n  diffdis submit slurm-shard captions.parquet s3://bucket/laion-64 --nodes 4 "
                             "--cpus-per-node 64 \\\n      --shard-config configs/data/digits.yaml image.size=64 --name laion64\n"
                             "Then: diffdis jobs status runs/laion64; logs in runs/laion64/slurm/.")
    ray.add_argument("source", metavar="SOURCE", help="as for diffdis shard")
    ray.add_argument("output", metavar="OUTPUT_URL", help="as for diffdis shard (a shared path or s3://)")
    ray.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted ShardConfig overrides")
    ray.add_argument("--shard-config", default=None, help="diffdis shard --config YAML")
    ray.add_argument("--nodes", type=int, default=1, help="nodes: 1 head (also a worker) + N-1 workers (default 1)")
    ray.add_argument("--cpus-per-node", type=int, default=32, help="CPUs Ray uses per node (default 32)")
    ray.add_argument("--partition", default=None)
    ray.add_argument("--account", default=None)
    ray.add_argument("--time", default=None)
    ray.add_argument("--name", default="diffdis-shard", help="job name (default diffdis-shard)")
    ray.add_argument("--run-dir", default=None, help="where the script, job id and log go (default runs/NAME)")
    ray.add_argument("--bin-dir", default=None, help="directory with ray and python on the compute nodes "
                     "(default: this interpreter's)")
    ray.add_argument("--setup", action="append", metavar="LINE", help="shell line before Ray starts (repeatable)")
    ray.add_argument("--dry-run", action="store_true", help="print the script and stop")
    ray.set_defaults(func=cmd_submit_slurm_shard)

    jobs = sub.add_parser("jobs", help="status, logs and cancel of Slurm jobs", formatter_class=fmt,
                          description=JOBS_DESCRIPTION)
    jobs.add_argument("action", choices=["status", "cancel", "logs"])
    jobs.add_argument("job", nargs="?", default=None, metavar="JOB", help="job id or run directory")
    jobs.add_argument("--json", action="store_true", help="status: one JSON object")
    jobs.add_argument("--signal", default=None, help="cancel: send this signal instead (USR1 = checkpoint and requeue)")
    jobs.add_argument("-n", "--lines", type=int, default=50, help="logs: last N lines (0 = all)")
    jobs.set_defaults(func=cmd_jobs)
    _add_k8s_parser(targets)


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None, help="run config YAML (as for diffdis train)")
    parser.add_argument("--out", type=Path, required=True, help="run directory on storage every node sees")
    parser.add_argument("--name", default="diffdis", help="job name (default diffdis)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be submitted and stop")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides for diffdis train")


K8S_EPILOG = """\
Examples:
  diffdis submit k8s --image registry.example.com/diffdis:0.1 --nodes 2 --gpus-per-node 8 \\
      --pvc diffdis-runs --out /data/runs/exp1 --config configs/tiny.yaml \\
      --secret-env AWS_ACCESS_KEY_ID=s3-creds/access-key --secret-env AWS_SECRET_ACCESS_KEY=s3-creds/secret-key \\
      --name exp1 --dry-run
  ... --operator pytorchjob        for clusters on the training operator v1 (PyTorchJob)
  ... --shard digits /data/shards  also a KubeRay RayJob running diffdis shard on a Ray cluster
--config and --out are paths inside the image / on the volume claim (mounted at --mount-path).
Logs: kubectl logs -l app.kubernetes.io/instance=NAME,app.kubernetes.io/component=trainer;
checkpoints: OUT/checkpoints on the claim; TensorBoard: kubectl port-forward svc/NAME-tensorboard 6006.
"""


def cmd_submit_k8s(args: argparse.Namespace) -> int:
    from cluster.k8s import K8sJob, ShardSpec, render_manifests, to_yaml  # noqa: PLC0415
    from cluster.k8s_validate import validate_manifests  # noqa: PLC0415

    if args.config is not None and Path(args.config).is_file():
        _check_training_config(args)  # the image's copy is what runs; a local copy is checked when there is one
    shard = ShardSpec(args.shard[0], args.shard[1], workers=args.ray_workers) if args.shard else None
    job = K8sJob(name=args.name, image=args.image, run_dir=str(args.out), config=str(args.config) if args.config else None,
                 overrides=list(args.overrides), namespace=args.namespace, nodes=args.nodes,
                 gpus_per_node=args.gpus_per_node, cpus_per_node=args.cpus_per_node, memory_per_node=args.memory_per_node,
                 operator=args.operator, backoff_limit=args.backoff_limit, grace_s=args.grace,
                 volume_claim=args.pvc, mount_path=args.mount_path, entry=args.entry, env=dict(_parse_env(args.env or [])),
                 secret_env=dict(_parse_env(args.secret_env or [])), tensorboard=not args.no_tensorboard, shard=shard,
                 evaluator=args.evaluator, eval_suite=args.eval_suite, eval_gpus=args.eval_gpus)
    manifests = render_manifests(job)
    validate_manifests(manifests)
    text = to_yaml(manifests)
    if args.dry_run:
        print(text, end="")
        return 0
    path = Path(args.write or f"{job.name}.k8s.yaml")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    kinds = ", ".join(f"{m['kind']}/{m['metadata']['name']}" for m in manifests)
    print(f"wrote {path} ({kinds}); validated offline")
    if args.apply:
        from cluster.k8s_apply import apply  # noqa: PLC0415

        print("created: " + ", ".join(apply(manifests)))
    else:
        print(f"submit with: kubectl apply -f {path}   (or rerun with --apply)")
    return 0


def _add_k8s_parser(targets: argparse._SubParsersAction) -> None:
    k8s = targets.add_parser("k8s", help="render, validate and (with --apply) create Kubernetes manifests",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=K8S_EPILOG,
                             description="Render the trainer as a Kubeflow Trainer v2 TrainJob (+ its TrainingRuntime, "
                             "whose podFailurePolicy restarts a pod that exits 75 without counting it against "
                             "--backoff-limit) or a PyTorchJob, TensorBoard as a Deployment + ClusterIP Service, and "
                             "with --shard the data pipeline as a KubeRay RayJob. Validated offline (strict) before "
                             "anything is written. Credentials only as Secret references (--secret-env).")
    _add_training_args(k8s)
    k8s.add_argument("--image", required=True, help="container image with diffdis installed")
    k8s.add_argument("--nodes", type=int, default=1, help="pods (one per node; default 1)")
    k8s.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per pod = ranks per pod (default 8; 0: one CPU rank)")
    k8s.add_argument("--cpus-per-node", type=int, default=None)
    k8s.add_argument("--memory-per-node", default=None, help="e.g. 512Gi")
    k8s.add_argument("--operator", choices=["trainjob", "pytorchjob"], default="trainjob",
                     help="trainjob: Kubeflow Trainer v2 (default); pytorchjob: the training operator v1")
    k8s.add_argument("--namespace", default="default")
    k8s.add_argument("--backoff-limit", type=int, default=3, help="failures other than exit 75 before the job fails")
    k8s.add_argument("--grace", type=int, default=120, metavar="SECONDS",
                     help="terminationGracePeriodSeconds: time to checkpoint after SIGTERM (default 120)")
    k8s.add_argument("--pvc", default=None, metavar="CLAIM", help="PersistentVolumeClaim holding runs, mounted at --mount-path")
    k8s.add_argument("--mount-path", default="/data")
    k8s.add_argument("--entry", default="diffdis", help="the diffdis command inside the image (default diffdis)")
    k8s.add_argument("--env", action="append", metavar="NAME=VALUE", help="non-secret variable (repeatable)")
    k8s.add_argument("--secret-env", action="append", metavar="NAME=SECRET/KEY",
                     help="variable read from a Kubernetes Secret (repeatable); the value never enters the manifest")
    k8s.add_argument("--shard", nargs=2, metavar=("SOURCE", "OUTPUT"), default=None,
                     help="also render a RayJob running `diffdis shard SOURCE OUTPUT --ray-address auto`")
    k8s.add_argument("--ray-workers", type=int, default=2, help="Ray worker pods for --shard (default 2)")
    k8s.add_argument("--evaluator", action="store_true", help="also a Deployment running `diffdis evaluator watch` "
                     "on the run's checkpoints (results in OUT/eval, shown by the TensorBoard Deployment)")
    k8s.add_argument("--eval-suite", default=None, help="evaluator suite YAML inside the image")
    k8s.add_argument("--eval-gpus", type=int, default=0, help="GPUs for the evaluator pod (default 0)")
    k8s.add_argument("--no-tensorboard", action="store_true", help="no TensorBoard Deployment/Service")
    k8s.add_argument("--write", default=None, metavar="FILE", help="where to write the manifests (default NAME.k8s.yaml)")
    k8s.add_argument("--apply", action="store_true", help="create the objects with the kubernetes client (needs a kubeconfig)")
    k8s.set_defaults(func=cmd_submit_k8s)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use `diffdis submit` / `diffdis jobs`")
