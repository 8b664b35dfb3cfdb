"""``diffdis shard`` as users run it: help, dry run, clear errors, kill + resume, no leaked credentials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import fsspec
import pytest

from pretrain.cli import main
from tests.shard_helpers import read_tree, write_folder


def _cli(*args: str, timeout: float = 240, verbose: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pretrain.cli", *(["-v"] if verbose else []), "shard", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


def test_help_explains_sources_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shard", "--help"])
    text = capsys.readouterr().out
    assert exit_info.value.code == 0
    for word in ("SOURCE", "OUTPUT_URL", "digits", "--storage-options", "--dry-run", "--ray-address", "duplicate"):
        assert word in text


def test_dry_run_shows_the_plan_and_writes_nothing(tmp_path, capsys):
    write_folder(tmp_path / "imgs", 20)
    code = main(["shard", str(tmp_path / "imgs"), str(tmp_path / "out"), "--samples-per-shard", "8", "--size", "16",
                 "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "out").exists()
    assert "20, 8 per shard -> 3 units" in out and "part-000000.tar" in out and '"size": 16' in out


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["{tmp}/t.csv", "{tmp}/out", "--caption-column", "text"], "'text'"),
        (["{tmp}/missing.parquet", "{tmp}/out"], "missing.parquet"),
        (["{tmp}/t.csv", "{tmp}/out", "image.sise=3"], "image.sise"),
        (["{tmp}/t.csv", "{tmp}/out", "--storage-options", "{not json"], "--storage-options"),
        (["{tmp}/t.csv", "{tmp}/out", "--samples-per-shard", "0"], "samples_per_shard"),
        (["{tmp}/t.csv", "nosuchproto://bucket/x"], "nosuchproto://bucket/x"),
    ],
)
def test_bad_input_exits_2_naming_the_culprit(args, named, tmp_path, capsys):
    (tmp_path / "t.csv").write_text("url,caption\na.jpg,hello\n")
    assert main(["shard", *[a.replace("{tmp}", str(tmp_path)) for a in args]]) == 2
    assert named in capsys.readouterr().err


@pytest.mark.integration
def test_killed_run_resumes_to_the_bytes_of_a_clean_run(tmp_path):
    source = write_folder(tmp_path / "imgs", 32)
    gate = tmp_path / "gate"
    out = tmp_path / "out"

    def args(output) -> list[str]:  # overrides go right after OUTPUT_URL (argparse positionals)
        return [str(source), str(output), f"filters.scorer_options={{gate: {gate}}}", "--samples-per-shard", "8",
                "--size", "8", "--num-workers", "2", "--no-progress", "--scorer", "tests.shard_helpers:gated_score"]

    job = subprocess.Popen([sys.executable, "-m", "pretrain.cli", "shard", *args(out)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not (out / "part-000000.stats.json").exists():
            assert job.poll() is None, job.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.1)
        job.send_signal(signal.SIGKILL)  # the driver only: its Ray must not leave the rerun hanging
        job.wait(timeout=30)
    finally:
        if job.poll() is None:
            job.kill()
    assert not (out / "manifest.json").exists() and not (out / "part-000003.tar").exists()
    gate.touch()
    resumed = _cli(*args(out), "--json")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["units_reused"] >= 1 and summary["units_written"] + summary["units_reused"] == 4
    clean = _cli(*args(tmp_path / "clean"))
    assert clean.returncode == 0, clean.stderr[-3000:]
    local = fsspec.filesystem("file")
    assert read_tree(local, str(out)) == read_tree(local, str(tmp_path / "clean"))
    again = _cli(*args(out))
    assert again.returncode == 0 and "Nothing to do" in again.stdout
    try:  # the killed driver's process group (its raylet, workers) must be gone or going
        os.killpg(job.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.mark.integration
def test_credentials_from_storage_options_never_reach_outputs_or_logs(tmp_path, s3_endpoint):
    source = write_folder(tmp_path / "imgs", 10)
    key_id, secret = "cli-key-id-7c1f", "cli-secret-d44e9a"
    options = {"key": key_id, "secret": secret, "client_kwargs": {"endpoint_url": s3_endpoint.url}}
    out = f"s3://{s3_endpoint.bucket}/creds"
    result = _cli(str(source), out, "--samples-per-shard", "4", "--size", "8", "--num-workers", "1", "--json",
                  "--storage-options", json.dumps(options), verbose=True)
    assert result.returncode == 0, result.stderr[-3000:]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    objects = read_tree(fs, f"{s3_endpoint.bucket}/creds")
    assert "manifest.json" in objects and len(objects) == 7
    for text in [result.stdout, result.stderr, *[b.decode("latin-1") for b in objects.values()]]:
        assert key_id not in text and secret not in text
