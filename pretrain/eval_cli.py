"""``diffdis evaluator watch``, ``diffdis dashboard`` and ``diffdis report``: watching a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cmd_watch(args: argparse.Namespace) -> int:
    from pretrain.evaluator import RESULTS, Evaluator, WatchOptions  # noqa: PLC0415
    from pretrain.suite import load_suite  # noqa: PLC0415

    suite = load_suite(args.suite)
    options = WatchOptions(poll_s=args.poll, once=args.once, newest_first=args.newest_first, device=args.device)
    evaluator = Evaluator(args.checkpoints, args.out, suite, options)
    try:
        count = evaluator.run()
    except KeyboardInterrupt:  # Ctrl-C: what finished is in the ledger; an interrupted checkpoint is redone
        count = None
        print("interrupted; the ledger holds every finished checkpoint (a restart continues from it)")
    statuses = {}
    for record in evaluator.ledger.records:
        statuses[record["status"]] = statuses.get(record["status"], 0) + 1
    print(f"evaluated {count} checkpoint(s) in this run; ledger {Path(args.out) / RESULTS}: {statuses}")
    print(json.dumps({"evaluated_this_run": count, "ledger": str(Path(args.out) / RESULTS), "statuses": statuses}))
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from pretrain.dashboard import serve  # noqa: PLC0415

    return serve(args.dirs, port=args.port)


def cmd_report(args: argparse.Namespace) -> int:
    from pretrain.report import write_report  # noqa: PLC0415

    out = write_report(args.eval_dir, args.out, run_dir=args.run)
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    evaluator = sub.add_parser("evaluator", help="evaluate checkpoints as training writes them (a separate process)",
                               description="The evaluator service. `diffdis evaluator watch --help` explains it.")
    actions = evaluator.add_subparsers(dest="action", required=True, metavar="ACTION")
    watch = actions.add_parser(
        "watch", formatter_class=fmt, help="poll a checkpoint directory and evaluate each complete checkpoint once",
        description="Poll CHECKPOINTS_URL (a local path or s3://bucket/prefix; step-NNNNNNNNN/ folders with COMPLETE) "
        "and run the suite on each complete checkpoint exactly once, in step order.\n"
        "Writes EVAL_DIR/results.jsonl (one line per finished checkpoint: evaluated, corrupt, deleted or failed),\n"
        "EVAL_DIR/tensorboard (eval/<task>/<metric> by training step, sample grids) and EVAL_DIR/samples/*.png.\n"
        "Restarted on the same EVAL_DIR it evaluates nothing twice and skips nothing. Incomplete checkpoints wait\n"
        "for COMPLETE; one pruned by keep-last-K meanwhile is logged and skipped; a file failing its CRC-32 is named\n"
        "and the checkpoint skipped. Reads only COMPLETE, config.yaml and the safetensors model folder.")
    watch.add_argument("checkpoints", metavar="CHECKPOINTS_URL", help="checkpoint root, e.g. RUN/checkpoints or s3://b/run/ckpts")
    watch.add_argument("--out", type=Path, required=True, metavar="EVAL_DIR", help="local results directory (e.g. RUN/eval)")
    watch.add_argument("--suite", type=Path, default=None, help="suite YAML (default configs/eval/digits.yaml)")
    watch.add_argument("--once", action="store_true", help="evaluate what is pending, then exit")
    watch.add_argument("--poll", type=float, default=30.0, metavar="S", help="seconds between listings (default 30)")
    watch.add_argument("--newest-first", action="store_true", help="when behind, newest checkpoint first")
    watch.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    watch.set_defaults(func=cmd_watch)

    dashboard = sub.add_parser("dashboard", help="TensorBoard on 127.0.0.1 for a run's training and eval events",
                               description="Start TensorBoard bound to 127.0.0.1 over the given directories (a run "
                               "directory shows RUN/tensorboard as 'train' and RUN/eval/tensorboard as 'eval'; an "
                               "EVAL_DIR shows its tensorboard/), print the URL, and serve until interrupted.")
    dashboard.add_argument("dirs", nargs="+", type=Path, metavar="RUN_OR_EVAL_DIR")
    dashboard.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    dashboard.set_defaults(func=cmd_dashboard)

    report = sub.add_parser("report", help="static HTML report of an evaluator's results",
                            description="Write EVAL_DIR/report/index.html: metrics-versus-step PNG plots (and the "
                            "training loss when the run's metrics.jsonl is found), the latest sample grid, and a "
                            "table of every checkpoint in the ledger.")
    report.add_argument("eval_dir", type=Path, metavar="EVAL_DIR")
    report.add_argument("--out", type=Path, default=None, help="report folder (default EVAL_DIR/report)")
    report.add_argument("--run", type=Path, default=None, help="run directory for the loss curve (default: EVAL_DIR's parent "
                        "when it holds metrics.jsonl)")
    report.set_defaults(func=cmd_report)
