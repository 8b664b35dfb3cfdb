"""``diffdis dashboard``: one TensorBoard, on 127.0.0.1 only, over a run's training and eval events.

The trainer writes ``RUN/tensorboard``; the evaluator writes ``EVAL_DIR/tensorboard`` with the same step
axis (a checkpoint's training step). Each directory becomes a TensorBoard run
(``train``, ``eval``) so both appear on the same charts. Loopback only: the dashboard shows a run's
samples and metrics, which are not for the network at large; reach it over an SSH tunnel.
"""

from __future__ import annotations

import atexit
import shutil
import signal
import tempfile
import time
from pathlib import Path


def runs(dirs: list[Path]) -> dict[str, Path]:
    """TensorBoard run name → event directory: a run directory gives ``train`` (RUN/tensorboard) and
    ``eval`` (RUN/eval/tensorboard); an evaluator's directory gives ``eval``. With several directories
    the names get the folder's name as a prefix (``runA-train``)."""
    found: dict[str, Path] = {}
    for directory in dirs:
        pairs = [(name, directory / sub) for name, sub in (("train", "tensorboard"), ("eval", "eval/tensorboard"))
                 if (directory / sub).is_dir()]
        if (directory / "results.jsonl").is_file() and (directory / "tensorboard").is_dir():
            pairs = [("eval", directory / "tensorboard")]
        if not pairs:
            raise FileNotFoundError(f"{directory} has no tensorboard/ (a run) or eval/tensorboard/ or results.jsonl "
                                    "(an evaluator's directory): nothing to show")
        prefix = f"{directory.resolve().name}-" if len(dirs) > 1 else ""
        found.update({f"{prefix}{name}": path.resolve() for name, path in pairs})
    return found


def start(dirs: list[Path], port: int = 0) -> str:
    """Start TensorBoard in this process (its server runs in a thread); returns its URL. The runs are
    symbolic links in a temporary folder, so TensorBoard names them ``train``/``eval`` (with
    ``--logdir_spec`` it would call them ``train/.``)."""
    from tensorboard import program  # noqa: PLC0415

    links = Path(tempfile.mkdtemp(prefix="diffdis-dashboard-"))
    atexit.register(shutil.rmtree, links, ignore_errors=True)
    for name, path in runs(dirs).items():
        (links / name).symlink_to(path, target_is_directory=True)
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", str(links), "--host", "127.0.0.1", "--port", str(port), "--reload_interval", "5"])
    return board.launch()


def serve(dirs: list[Path], port: int = 0) -> int:
    url = start(dirs, port)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))  # atexit cleanup runs on SIGTERM too
    print(f"TensorBoard at {url} (127.0.0.1 only; Ctrl-C stops it)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
