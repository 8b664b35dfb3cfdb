"""Each kernel against its PyTorch reference: error always, time and peak memory on a GPU only.

On a CPU machine the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set here
before triton is imported), which is orders of magnitude slower than PyTorch: this run checks
correctness only and makes no speed claims. On CUDA, at sd-base's shapes (256² images → 32² latents;
channels 320/640/1280, 32 groups, head size 64, 77 caption tokens, query width 768):

- attention, bf16, forward+backward: xformers vs SDPA (flash / efficient / cuDNN / math) vs naive;
- GroupNorm+SiLU, bf16 channels-last and fp32, forward+backward: fused Triton vs eager vs torch.compile;
- InfoNCE, fp32 unit embeddings, forward+backward at global batch 4k / 16k / 32k: fused vs eager,
  time and peak memory;
- the whole sd-base training step (bench_step.py's: objective forward+backward+AdamW, bf16 autocast)
  with every kernel on vs off: step time, samples/s and model FLOPs utilisation (FLOPs counted on the
  eager step; peak bf16 dense FLOP/s from the device name, MFU omitted for unknown devices).

    python benchmarks/bench_kernels.py [--quick] [--step-batch N]

Prints tables, then one JSON object of the figures as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

if not torch.cuda.is_available():  # before anything imports triton (see kernels/_triton.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from kernels._triton import triton_runs_on  # noqa: E402
from kernels.attention import BACKENDS, attention, reference_attention  # noqa: E402
from kernels.groupnorm_silu import GroupNormSiLUFunction, reference_groupnorm_silu  # noqa: E402
from kernels.infonce import fused_symmetric_info_nce, reference_symmetric_info_nce  # noqa: E402


def _max_err(got, want) -> float:
    return max((g.float() - w.float()).abs().max().item() for g, w in zip(got, want))


def _fwd_bwd(fn, inputs, grad_out=None):
    """Outputs then gradients of ``fn(*inputs)`` (a scalar, or reduced with ``grad_out``)."""
    for t in inputs:
        t.grad = None
    out = fn(*inputs)
    out.backward(grad_out) if grad_out is not None else out.backward()
    return [out.detach()] + [t.grad.detach().clone() for t in inputs]


def _time_ms(fn, iters: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    return statistics.median(samples)


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths)))


# ---------------------------------------------------------------- correctness (any device)

def check_correctness(device: torch.device, quick: bool) -> dict:
    """Max |fused - reference| over values and gradients, fp32, small shapes with ragged tiles."""
    gen = torch.Generator().manual_seed(0)
    figures = {}

    q, k, v = (torch.randn(2, 3, 37, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    mask = (torch.arange(37)[None, :] < torch.tensor([37, 5])[:, None]).to(device)
    grad = torch.randn(2, 3, 37, 16, generator=gen).to(device)
    want = _fwd_bwd(lambda a, b, c: reference_attention(a, b, c, mask), (q, k, v), grad)
    for backend in ("sdpa", "xformers") if device.type == "cuda" else ("sdpa",):
        os.environ["DIFFDIS_ATTENTION"] = backend
        try:
            figures[f"attention_{backend}_max_err"] = _max_err(_fwd_bwd(lambda a, b, c: attention(a, b, c, mask), (q, k, v), grad), want)
        except RuntimeError as error:  # xformers not installed
            print(f"attention {backend}: skipped ({error})")
        finally:
            os.environ.pop("DIFFDIS_ATTENTION", None)

    for shape, groups in [((2, 20, 9, 11), 5), ((1, 32, 8, 8), 8)] + ([] if quick else [((2, 64, 16, 16), 32)]):
        x = (torch.randn(shape, generator=gen) * 2 + 1).to(device).requires_grad_()
        w, b = (torch.randn(shape[1], generator=gen).to(device).requires_grad_() for _ in range(2))
        grad = torch.randn(shape, generator=gen).to(device)
        fused = _fwd_bwd(lambda *t: GroupNormSiLUFunction.apply(*t, groups, 1e-6), (x, w, b), grad)
        ref = _fwd_bwd(lambda *t: reference_groupnorm_silu(t[0], groups, t[1], t[2], 1e-6), (x, w, b), grad)
        figures[f"groupnorm_silu_{'x'.join(map(str, shape))}_g{groups}_max_err"] = _max_err(fused, ref)

    for n, dim, scale in [(37, 24, 14.3), (130, 64, 100.0)] + ([] if quick else [(300, 128, 100.0)]):
        p, t = (F.normalize(torch.randn(n, dim, generator=gen), dim=-1).to(device).requires_grad_() for _ in range(2))
        s = torch.tensor(scale, device=device, requires_grad=True)
        fused = _fwd_bwd(lambda a, b, c: fused_symmetric_info_nce(a, b, a, b, c), (p, t, s))
        ref = _fwd_bwd(lambda a, b, c: reference_symmetric_info_nce(a, b, a, b, c), (p, t, s))
        figures[f"infonce_n{n}_d{dim}_scale{scale:g}_max_err"] = _max_err(fused, ref)

    _table("correctness: max |fused - reference| over values and gradients (fp32)", ["check", "max abs error"],
           [[name.removesuffix("_max_err"), f"{err:.2e}"] for name, err in figures.items()])
    return figures


# ---------------------------------------------------------------- speed (CUDA only)

def bench_attention(quick: bool) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

    device, dtype = torch.device("cuda"), torch.bfloat16
    batch = 8
    # (name, heads, query tokens, key tokens): sd-base self-attention at latent 32², 16², 8² (+1 text
    # token), and cross-attention of the 32² level to 77 caption tokens
    shapes = [("self 32x32", 5, 1025, 1025), ("self 16x16", 10, 257, 257), ("self 8x8", 20, 65, 65), ("cross 32x32", 5, 1024, 77)]
    shapes = shapes[:1] + shapes[3:] if quick else shapes
    sdpa = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
    rows, figures = [], {}
    for name, heads, nq, nk in shapes:
        q = torch.randn(batch, heads, nq, 64, device=device, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(batch, heads, nk, 64, device=device, dtype=dtype, requires_grad=True) for _ in range(2))

        def step(fn):
            return lambda: fn(q, k, v).sum().backward()

        candidates = {"naive": reference_attention}
        for label, backend in sdpa.items():
            candidates[label] = (lambda b: lambda *t: _with_sdpa(b, sdpa_kernel, *t))(backend)
        candidates["xformers"] = _xformers_or_none()
        row = [name]
        for label, fn in candidates.items():
            if fn is None:
                row.append("n/a")
                continue
            try:
                ms = _time_ms(step(fn), 5 if quick else 20)
            except RuntimeError:  # this SDPA backend does not take these shapes / this GPU
                row.append("n/a")
                continue
            figures[f"attention_{name.replace(' ', '_')}_{label}_ms"] = ms
            row.append(f"{ms:.3f}")
        rows.append(row)
    _table(f"attention fwd+bwd, bf16, batch {batch}, head size 64 (ms, median)", ["shape", *candidates], rows)
    return figures


def _with_sdpa(backend, sdpa_kernel, q, k, v):
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v)


def _xformers_or_none():
    try:
        import xformers.ops as xops  # noqa: PLC0415
    except Exception:
        return None
    return lambda q, k, v: xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def bench_groupnorm_silu(quick: bool) -> dict:
    device = torch.device("cuda")
    eager = lambda x, w, b: reference_groupnorm_silu(x, 32, w, b, 1e-5)  # noqa: E731
    compiled = torch.compile(eager)
    fused = lambda x, w, b: GroupNormSiLUFunction.apply(x, w, b, 32, 1e-5)  # noqa: E731
    shapes = [(16, 320, 32, 32), (16, 640, 16, 16), (16, 1280, 8, 8)]
    rows, figures = [], {}
    for dtype, channels_last in [(torch.bfloat16, True), (torch.float32, False)]:
        for shape in shapes[:1] if quick else shapes:
            x = torch.randn(shape, device=device, dtype=dtype)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            x.requires_grad_()
            # parameters in the input's dtype: eager group_norm need not accept bf16 input with fp32 weights
            w = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
            b = torch.randn(shape[1], device=device, dtype=dtype, requires_grad=True)
            grad = torch.randn_like(x)
            times = {label: _time_ms(lambda fn=fn: fn(x, w, b).backward(grad), 5 if quick else 20)
                     for label, fn in (("eager", eager), ("compile", compiled), ("fused", fused))}
            err = _max_err(_fwd_bwd(fused, (x, w, b), grad), _fwd_bwd(eager, (x, w, b), grad))
            key = f"gn_silu_{'x'.join(map(str, shape))}_{str(dtype).removeprefix('torch.')}"
            figures.update({f"{key}_{label}_ms": ms for label, ms in times.items()})
            figures[f"{key}_speedup_vs_eager"] = times["eager"] / times["fused"]
            figures[f"{key}_max_err"] = err
            rows.append([key.removeprefix("gn_silu_"), *(f"{times[k]:.3f}" for k in ("eager", "compile", "fused")),
                         f"{times['eager'] / times['fused']:.2f}x", f"{err:.1e}"])
    _table("GroupNorm(32)+SiLU fwd+bwd (ms, median; bf16 rows channels-last)",
           ["shape/dtype", "eager", "compile", "fused", "fused vs eager", "max err"], rows)
    return figures


def bench_infonce(quick: bool) -> dict:
    device = torch.device("cuda")
    rows, figures = [], {}
    for n in (4096, 16384) if quick else (4096, 16384, 32768):
        p, t = (F.normalize(torch.randn(n, 768, device=device), dim=-1).requires_grad_() for _ in range(2))
        s = torch.tensor(100.0, device=device, requires_grad=True)
        result = {}
        for label, fn in (("eager", reference_symmetric_info_nce), ("fused", fused_symmetric_info_nce)):
            def step(fn=fn):
                for x in (p, t, s):
                    x.grad = None
                fn(p, t, p, t, s).backward()
            try:
                result[f"{label}_ms"] = _time_ms(step, 3 if quick else 10, warmup=1)
                result[f"{label}_peak_mib"] = _peak_mib(step)
            except torch.OutOfMemoryError:
                result[f"{label}_ms"] = result[f"{label}_peak_mib"] = float("nan")
                torch.cuda.empty_cache()
        figures.update({f"infonce_n{n}_{k}": v for k, v in result.items()})
        rows.append([n, *(f"{result[k]:.2f}" for k in ("eager_ms", "fused_ms")),
                     f"{result['eager_ms'] / result['fused_ms']:.2f}x",
                     *(f"{result[k]:.0f}" for k in ("eager_peak_mib", "fused_peak_mib"))])
    _table("symmetric InfoNCE fwd+bwd, fp32, D=768 (one process)",
           ["global batch", "eager ms", "fused ms", "speedup", "eager peak MiB", "fused peak MiB"], rows)
    return figures


PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}  # dense


def bench_step_with_kernels(size: str, batch: int, quick: bool, device: torch.device) -> dict:
    """The unified training step with kernels off, then on (fused GroupNorm+SiLU and InfoNCE)."""
    from bench_step import build, count_flops, make_batch, time_steps  # noqa: PLC0415 - benchmarks/ is on sys.path

    from kernels import KernelsConfig, apply_kernels  # noqa: PLC0415

    name = torch.cuda.get_device_name() if device.type == "cuda" else ""
    peak = next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)
    rows, figures = [], {}
    flops = None
    for label, fused in (("off", False), ("on", True)):
        objective, optimizer, config = build(size, "unified", device)
        apply_kernels(objective.model, KernelsConfig(fused_infonce=fused, fused_groupnorm_silu=fused))
        objective.fused_infonce = fused
        data = make_batch(config, batch, device)
        if flops is None:  # Triton kernels are invisible to the FLOP counter: count the eager step
            flops = count_flops(objective, optimizer, data)
        times = time_steps(objective, optimizer, data, 3 if quick else 10, warmup=2, device=device)
        seconds = statistics.median(times)
        mfu = flops / seconds / peak if peak else None
        figures.update({f"step_{size}_kernels_{label}_ms": 1000 * seconds,
                        f"step_{size}_kernels_{label}_samples_per_s": batch / seconds,
                        f"step_{size}_kernels_{label}_mfu": mfu})
        rows.append([label, f"{1000 * seconds:.1f}", f"{batch / seconds:.1f}", "n/a" if mfu is None else f"{100 * mfu:.1f}%"])
        del objective, optimizer
        if device.type == "cuda":
            torch.cuda.empty_cache()
    figures[f"step_{size}_gflop"] = flops / 1e9
    figures[f"step_{size}_speedup_kernels_on"] = figures[f"step_{size}_kernels_off_ms"] / figures[f"step_{size}_kernels_on_ms"]
    _table(f"{size} unified step, batch {batch}, bf16 autocast ({flops / 1e9:.0f} GFLOP/step; goal MFU >= 40%)",
           ["kernels", "ms/step", "samples/s", "MFU"], rows)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations (CPU: under 2 minutes)")
    parser.add_argument("--step-batch", type=int, default=None, help="sd-base step batch on CUDA (default 8 quick, 32)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    started = time.perf_counter()
    print(f"device: {name}; torch {torch.__version__}; attention backends: {', '.join(BACKENDS)}")
    if not cuda:
        print("CPU: Triton kernels run in Triton's interpreter: correctness only, no speed claims")
    figures = {"device": name, "mode": "speed+correctness" if cuda else "correctness only, no speed claims",
               "quick": args.quick, "triton_path": triton_runs_on(torch.empty(0, device=device))}
    if not figures["triton_path"]:
        print("Triton cannot run here (not installed, or imported before TRITON_INTERPRET=1): the fused "
              "InfoNCE rows below measure its PyTorch fallback")
    figures.update(check_correctness(device, args.quick))
    if cuda:
        figures.update(bench_attention(args.quick))
        figures.update(bench_groupnorm_silu(args.quick))
        figures.update(bench_infonce(args.quick))
        figures.update(bench_step_with_kernels("sd-base", args.step_batch or (8 if args.quick else 32), args.quick, device))
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
