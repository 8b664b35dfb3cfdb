"""Sharding throughput: ``diffdis shard`` versus img2dataset on the same URL table, side by side.

Both tools read one Parquet URL table served over a loopback ``http.server``, download, decode,
center-crop to the same size, encode JPEG at the same quality and write WebDataset shards of the
same size, with the same number of worker processes. Images are photos from scikit-image's
bundled samples, randomly cropped, flipped and resized (200-720 px wide), written as JPEGs.

img2dataset runs from its own venv (``.venv-bench/``, created on first run: ``python -m venv`` +
``pip install img2dataset==1.47.0``) so its dependencies never touch the project's environment.

    python benchmarks/bench_pipeline.py [--quick] [--images N] [--size 64] [--workers 2]

Reports end-to-end wall time (process start to exit, what a user waits for) and processing time
(first download to last shard; ours from the summary, img2dataset's from its per-shard stats),
samples/s and samples/s/core for each, and the ratio ours / img2dataset. Prints a table, then one
JSON object of the figures as the last line. The goal is ours >= 1.5x img2dataset.
"""

from __future__ import annotations

import argparse
import functools
import glob
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
BENCH_VENV = ROOT / ".venv-bench"
IMG2DATASET_VERSION = "1.47.0"


def make_images(directory: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct JPEG photos (cached in ``directory`` across runs)."""
    import skimage.data as samples  # noqa: PLC0415

    directory.mkdir(parents=True, exist_ok=True)
    names = [f"{i:06d}.jpg" for i in range(count)]
    if all((directory / n).exists() for n in names):
        return names
    bases = [samples.astronaut(), samples.coffee(), samples.chelsea(), samples.rocket(), samples.hubble_deep_field(),
             np.repeat(samples.camera()[:, :, None], 3, axis=2)]
    rng = np.random.default_rng(seed)
    for i, name in enumerate(names):
        base = bases[i % len(bases)]
        height, width = base.shape[:2]
        crop_h, crop_w = int(height * rng.uniform(0.5, 1.0)), int(width * rng.uniform(0.5, 1.0))
        top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
        picture = Image.fromarray(base[top:top + crop_h, left:left + crop_w])
        if rng.random() < 0.5:
            picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        target_w = int(rng.integers(200, 721))
        picture = picture.resize((target_w, max(1, round(crop_h * target_w / crop_w))), Image.Resampling.BILINEAR)
        picture.save(directory / name, "JPEG", quality=int(rng.integers(80, 96)))
    return names


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(directory: Path) -> ThreadingHTTPServer:
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(directory)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def write_table(path: Path, base_url: str, names: list[str]) -> None:
    import pyarrow as pa  # noqa: PLC0415
    import pyarrow.parquet as pq  # noqa: PLC0415

    captions = [f"a photo, crop number {i}" for i in range(len(names))]
    pq.write_table(pa.table({"url": [f"{base_url}/{n}" for n in names], "caption": captions}), path)


def ensure_img2dataset() -> tuple[Path | None, str]:
    """The bench venv's ``img2dataset`` executable, creating the venv on first use; or why not."""
    executable = BENCH_VENV / "bin" / "img2dataset"
    if executable.exists():
        return executable, ""
    try:
        if not (BENCH_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(BENCH_VENV)], check=True, capture_output=True, text=True)
        pip = [str(BENCH_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        # img2dataset 1.47.0 pulls opencv-python-headless and albumentations but not torch (checked), so no
        # CUDA wheel can arrive here; if a later version asks for torch, pin torch==2.13.0 (CPU) first.
        subprocess.run([*pip, f"img2dataset=={IMG2DATASET_VERSION}"], check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as error:
        return None, f"installing img2dataset into {BENCH_VENV} failed: {(error.stderr or error.stdout)[-800:]}"
    return (executable, "") if executable.exists() else (None, f"{executable} missing after install")


def run_img2dataset(executable: Path, table: Path, out: Path, args) -> dict:
    command = [
        str(executable), "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
        "--processes_count", str(args.workers), "--thread_count", "64", "--image_size", str(args.size),
        "--resize_mode", "center_crop", "--encode_format", "jpg", "--encode_quality", "95",
        "--number_sample_per_shard", str(args.samples_per_shard), "--distributor", "multiprocessing",
        "--enable_wandb", "False", "--timeout", "10", "--retries", "0",
    ]
    env = {**os.environ, "PYTHONPATH": "", "CUDA_VISIBLE_DEVICES": ""}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"img2dataset exited {result.returncode}: {result.stderr[-1500:]}")
    stats = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / "*_stats.json"))]
    samples = sum(s.get("successes", 0) for s in stats)
    starts = [s["start_time"] for s in stats if "start_time" in s]
    ends = [s["end_time"] for s in stats if "end_time" in s]
    process = (max(ends) - min(starts)) if starts and ends else wall
    return {"samples": samples, "wall_s": wall, "process_s": process, "shards": len(glob.glob(str(out / "*.tar")))}


def run_ours(table: Path, out: Path, args) -> dict:
    command = [
        sys.executable, "-m", "pretrain.cli", "shard", str(table), str(out), "--size", str(args.size),
        "--resize-mode", "center_crop", "--format", "jpg", "--quality", "95",
        "--samples-per-shard", str(args.samples_per_shard), "--num-workers", str(args.workers),
        "--timeout", "10", "--retries", "0", "--no-progress", "--json",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"diffdis shard exited {result.returncode}: {result.stderr[-1500:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    return {"samples": summary["samples"], "wall_s": wall, "process_s": summary["process_s"], "shards": summary["shards"]}


def rates(record: dict, cores: int) -> dict:
    record["samples_per_s"] = record["samples"] / record["wall_s"]
    record["samples_per_s_per_core"] = record["samples_per_s"] / cores
    record["process_samples_per_s"] = record["samples"] / record["process_s"]
    record["process_samples_per_s_per_core"] = record["process_samples_per_s"] / cores
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in record.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2,000 images (under 2 minutes once the venv exists)")
    parser.add_argument("--images", type=int, default=None, help="number of images (default 10,000; quick 2,000)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both tools")
    parser.add_argument("--samples-per-shard", type=int, default=500)
    args = parser.parse_args()
    count = args.images or (2000 if args.quick else 10000)
    cores = args.workers

    cache = Path(tempfile.gettempdir()) / f"diffdis-bench-images-{count}"
    start = time.perf_counter()
    names = make_images(cache, count)
    print(f"{count} source images in {cache} ({time.perf_counter() - start:.1f} s)", flush=True)
    executable, why_not = ensure_img2dataset()
    server = serve(cache)
    results: dict = {"images": count, "size": args.size, "workers": args.workers, "machine_cpus": os.cpu_count(),
                     "samples_per_shard": args.samples_per_shard}
    try:
        with tempfile.TemporaryDirectory() as scratch:
            table = Path(scratch) / "urls.parquet"
            write_table(table, f"http://127.0.0.1:{server.server_address[1]}", names)
            results["ours"] = rates(run_ours(table, Path(scratch) / "ours", args), cores)
            if executable is not None:
                results["img2dataset"] = rates(run_img2dataset(executable, table, Path(scratch) / "i2d", args), cores)
            else:
                results["img2dataset"] = {"error": why_not}
    finally:
        server.shutdown()
    ours, theirs = results["ours"], results["img2dataset"]
    print(f"\n{'tool':<12} {'samples':>8} {'wall s':>8} {'samples/s':>10} {'/core':>8} {'proc s':>8} {'proc/s':>9} {'/core':>8}")
    for name in ("ours", "img2dataset"):
        r = results[name]
        if "error" in r:
            print(f"{name:<12} unavailable: {r['error'][:200]}")
            continue
        print(f"{name:<12} {r['samples']:>8} {r['wall_s']:>8.1f} {r['samples_per_s']:>10.0f} {r['samples_per_s_per_core']:>8.0f} "
              f"{r['process_s']:>8.1f} {r['process_samples_per_s']:>9.0f} {r['process_samples_per_s_per_core']:>8.0f}")
    if "error" not in theirs:
        results["ratio_e2e"] = round(ours["samples_per_s"] / theirs["samples_per_s"], 2)
        results["ratio_processing"] = round(ours["process_samples_per_s"] / theirs["process_samples_per_s"], 2)
        print(f"\nours / img2dataset: {results['ratio_e2e']:.2f}x end to end, {results['ratio_processing']:.2f}x processing "
              "(goal >= 1.5x)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
