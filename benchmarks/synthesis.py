"""Engine speed and memory: latency per view, peak memory, distance to the compute floor, speed-up.

    python benchmarks/synthesis.py                             # tiny architecture on the CPU, < 1 min
    python benchmarks/synthesis.py --arch published --quick    # 512/256/1024 px, full size, needs CUDA
    bash .whl/run.sh --arch published --resolutions 512        # on the GPU machine (../shared/gpu/)

SPEED TEST ONLY: the weights are random (speed does not depend on their values); no image made
here means anything. Runs with the engine's modules alone (torch, diffusers, transformers; never
dicomnode's network or storage code), as on a GPU machine without the node's dependencies.

Scenarios, per resolution (``--views`` views, default 8, guidance 3.0):

* ``public``: the public code's way: one view per call, float16 (float32 on the CPU), 30 steps,
  eager. The reference every speed-up is measured against.
* ``eager``: all views in one batched call, 20 steps, bfloat16 on CUDA, no compilation.
* ``compiled``: the same through the fast path (:mod:`synthesis.fastpath`): transformer and VAE
  decoder compiled with static shapes, CUDA graphs on CUDA. On the CPU the backend is aot_eager (the
  compiled path's capture and shapes are exercised in seconds; it is no faster than eager there).
  ``Δ eager`` is the largest absolute pixel difference (images in [0, 1]) from the ``eager`` row:
  the same views, seeds and weights; marked ``!`` above the stated tolerance (:data:`TOLERANCE`:
  5e-2 in bfloat16 on CUDA, where fused kernels round differently over 20 steps; 1e-5 in float32).
* without ``--quick``: compiled without CUDA graphs (CUDA only), and batch sizes 1/4/8/16 (that
  many views in one call), eager and compiled.

The compute floor of a scenario is its FLOPs over the device peak:
``views x (transformer forward x steps x 2 with CFG + VAE decode) + calls x conditioning`` (CLIP
and VAE encode of the input, once per call), each counted by ``torch.utils.flop_counter`` on a real
forward at batch 1. The peak is ``--peak-tflops``, else a measured GEMM rate (bfloat16 8192^3 on
CUDA, float32 1024^3 on the CPU). ``x floor`` = measured / floor; ``speed-up`` = the public way's
time per view / this row's. ``warm s`` is the first call (compilation, graph capture, autotune).
Peak memory is the CUDA allocator's peak for the timed calls; on the CPU the process's peak RSS.
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    from diffusers import DPMSolverMultistepScheduler
except Exception as e:  # the GPU machine has no diffusers of its own: it travels as wheels (../shared/gpu)
    raise SystemExit(
        f"cannot import diffusers ({type(e).__name__}: {e}). On the GPU machine carry it and what it "
        "imports: bash ../shared/gpu/prepare.sh requests urllib3 idna certifi charset_normalizer"
    ) from e
from diffusers.utils import logging as diffusers_logging
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthesis.architecture import Architecture, build_components, published, tiny  # noqa: E402
from synthesis.fastpath import FastPath, disable_compile, enable_fast_path  # noqa: E402
from synthesis.pipeline import SvdrrPipeline  # noqa: E402

# Nominal dense bf16/fp16 tensor-core peaks (TFLOP/s), printed beside the measured GEMM rate.
NOMINAL_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
GUIDANCE = 3.0
TOLERANCE = {"cuda": 5e-2, "cpu": 1e-5}  # largest |compiled - eager| pixel difference accepted
DEFAULT_BUDGET_S = {"cuda": 400.0, "cpu": 45.0}  # run.sh kills the run at 480 s; the CPU run is a smoke test
COLUMNS = "{:>7} {:<30} {:>5} {:>8} {:>8} {:>8} {:>9} {:>8} {:>7} {:>8} {:>8} {:>6}"


@dataclass
class Scenario:
    name: str
    views: int
    steps: int = 20
    per_call: bool = False
    half: bool = False  # float16 (the public code's precision) instead of the fast dtype
    compiled: bool = False
    graphs: bool = True
    compare_to: str | None = None  # name of the eager scenario to compare pixels with


@dataclass
class Result:
    total_s: float
    first_s: float
    peak_mb: float
    images: np.ndarray
    finite: bool
    extra: dict[str, Any] = field(default_factory=dict)


def scenarios(n: int, quick: bool, cuda: bool) -> list[Scenario]:
    """In run order: the public way first (the reference), eager before compiled (compiling is in place)."""
    half = "fp16" if cuda else "fp32"
    out = [
        Scenario(f"public {n}x1v 30st {half}", n, steps=30, per_call=True, half=cuda),
        Scenario(f"eager {n}v 20st", n),
    ]
    if not quick:
        out += [Scenario(f"eager batch {b} 20st", b) for b in (1, 4, 16) if b != n]
        if cuda:
            out.append(Scenario(f"compiled no-graphs {n}v", n, compiled=True, graphs=False, compare_to=out[1].name))
    out.append(Scenario(f"compiled {n}v 20st", n, compiled=True, compare_to=out[1].name))
    if not quick:
        out += [
            Scenario(f"compiled batch {b} 20st", b, compiled=True, compare_to=f"eager batch {b} 20st")
            for b in (1, 4, 16)
            if b != n
        ]
    return out


# ------------------------------------------------------------------------------ measurements
def measured_peak_tflops(device: torch.device) -> float:
    """A GEMM rate the device reaches: bf16 8192^3 on CUDA, float32 1024^3 on the CPU."""
    if device.type == "cuda":
        n, dtype, reps = 8192, torch.bfloat16, 30
    else:
        n, dtype, reps = 1024, torch.float32, 20
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def count_flops(pipe: SvdrrPipeline) -> dict[str, float]:
    """FLOPs at batch 1 and the native resolution: transformer forward, VAE decode, conditioning."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    side = pipe.resolution // pipe.vae_scale_factor
    c = pipe.latent_channels
    x = torch.zeros(1, 2 * c, side, side, device=device, dtype=dtype)
    ctx = torch.zeros(1, 1, pipe.transformer.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.zeros(1, device=device, dtype=torch.long)
    kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    flops = {}
    # The math attention kernel: plain matmuls the counter knows (fused kernels may go uncounted).
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as counter:
            pipe.transformer.forward(x, encoder_hidden_states=ctx, timestep=t, **kw)
        flops["transformer"] = float(counter.get_total_flops())
        flops["decode"] = 0.0
        image = torch.zeros(1, 1, pipe.resolution, pipe.resolution, device=device)
        with FlopCounterMode(display=False) as counter:
            pipe.encode_image_embeds(image)
            pipe.encode_condition_latent(image)
        flops["condition"] = float(counter.get_total_flops())
        if pipe.vae is not None:
            z = torch.zeros(1, c, side, side, device=device, dtype=pipe.vae.dtype)
            with FlopCounterMode(display=False) as counter:
                pipe.vae.decode(z)
            flops["decode"] = float(counter.get_total_flops())
    return flops


def floor_flops(flops: dict[str, float], s: Scenario) -> float:
    calls = s.views if s.per_call else 1
    rows = 2 if GUIDANCE > 1 else 1
    return s.views * (flops["transformer"] * s.steps * rows + flops["decode"]) + calls * flops["condition"]


def run(pipe: SvdrrPipeline, s: Scenario, image: np.ndarray, device: torch.device, repeats: int) -> Result:
    azimuths = [float(a) for a in np.linspace(-90, 90, s.views)]
    calls = [[a] for a in azimuths] if s.per_call else [azimuths]

    def once(some: list[list[float]] | None = None) -> np.ndarray:
        kw = {"num_inference_steps": s.steps, "guidance_scale": GUIDANCE, "generator": 0}
        return np.concatenate([pipe(image, azimuths=az, max_batch=len(az), **kw).images for az in some or calls])

    _sync(device)
    t = time.perf_counter()
    if device.type == "cpu" and not s.compiled:  # nothing to warm on the CPU: the first call counts
        images = once()
        first_s = time.perf_counter() - t
        return Result(first_s, first_s, _rss_mb(), images, bool(np.isfinite(images).all()))
    once(calls[:1])  # compilation, graph warm-up, cuDNN autotune, allocator growth (per call: one has all shapes)
    _sync(device)
    first_s = time.perf_counter() - t
    if s.compiled:
        once()  # CUDA graph trees record on a later call of the shape than the first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        images = once()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _rss_mb()
    return Result(statistics.median(times), first_s, peak, images, bool(np.isfinite(images).all()))


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- building
def build(arch: Architecture, device: torch.device) -> SvdrrPipeline:
    """Random float32 components on ``device`` (made there directly on CUDA: much faster)."""
    components = None
    if device.type == "cuda":
        try:
            with torch.device(device):
                components = build_components(arch)
        except Exception as e:  # some library refuses a default device: build on the CPU and move
            print(f"  (building on {device} failed: {type(e).__name__}: {e}; building on the CPU)")
            components = None
    if components is None:
        components = build_components(arch)
    # The scheduler keeps its tables on the CPU (it converts them to numpy): make it outside the context.
    components["scheduler"] = DPMSolverMultistepScheduler.from_config(components["scheduler"].config)
    pipe = SvdrrPipeline(**components)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def set_precision(pipe: SvdrrPipeline, dtype: torch.dtype) -> None:
    """As the loader does: every module in ``dtype``, except an fp16 SDXL-type VAE kept in float32."""
    pipe.transformer.to(dtype)
    pipe.cc_projection.to(dtype)
    if pipe.image_encoder is not None:
        pipe.image_encoder.to(dtype)
    if pipe.vae is not None:
        pipe.vae.to(torch.float32 if dtype == torch.float16 else dtype)
    pipe._fp32_vae = None


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "published"], default="tiny")
    ap.add_argument("--resolutions", default=None, help="comma-separated; default 512,256,1024 (tiny: 32,64)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the floor (default: measured)")
    ap.add_argument("--quick", action="store_true", help="only the goal scenarios: public, eager, compiled")
    ap.add_argument("--no-compile", action="store_true", help="skip the compiled scenarios")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor; aot_eager on CPU)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per scenario (median; default 3, CPU 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: tiny ops only pay sync costs)")
    ap.add_argument("--budget-s", type=float, default=None, help="skip scenarios once this many seconds have passed")
    args = ap.parse_args(argv)
    diffusers_logging.set_verbosity_error()
    started = time.perf_counter()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    if args.arch == "published" and not cuda:
        print("published sizes need CUDA; none here. Run --arch tiny on the CPU.")
        return 2
    if not cuda:
        torch.set_num_threads(args.threads)
    else:  # as the node does (synthesis.fastpath), for every scenario alike: TF32 for what stays
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 (an fp16 run's VAE), cuDNN autotuning
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    fast = torch.bfloat16 if cuda else torch.float32
    backend = args.backend or ("inductor" if cuda else "aot_eager")
    repeats = args.repeats or (2 if cuda else 1)
    budget = args.budget_s if args.budget_s is not None else DEFAULT_BUDGET_S[device.type]
    default_res = "512,256,1024" if args.arch == "published" else "32,64"
    resolutions = [int(r) for r in (args.resolutions or default_res).split(",")]

    import diffusers
    import transformers

    if cuda:
        name = torch.cuda.get_device_name(device)
        nominal = next((v for k, v in NOMINAL_PEAKS.items() if k in name), None)
    else:
        name, nominal = f"CPU x{torch.get_num_threads()} threads", None
    gemm = measured_peak_tflops(device)
    peak = args.peak_tflops or gemm
    print("SPEED TEST with random weights: not a model; no output here is an image of anything.")
    print(
        f"device {name}; torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__}, Python {sys.version.split()[0]}"
    )
    print(
        f"peak for the floor {peak:.3g} TFLOP/s ({'given' if args.peak_tflops else 'measured GEMM'}; "
        f"measured {'bf16' if cuda else 'fp32'} GEMM {gemm:.3g}"
        + (f", nominal dense {nominal:.0f}" if nominal else "")
        + f"); fast dtype {str(fast).removeprefix('torch.')}; compile backend {backend}; guidance {GUIDANCE}"
    )
    print(
        COLUMNS.format(
            "res", "scenario", "views", "total s", "s/view", "warm s", "peak MiB", "floor s", "x floor",
            "speed-up", "Δ eager", "finite",
        )  # fmt: skip
    )
    summary = []
    for res in resolutions:
        arch = published(res) if args.arch == "published" else tiny(res)
        label = f"{res}px" if args.arch == "published" else f"tiny{res}"
        if time.perf_counter() - started > budget:
            print(f"{label:>7} skipped: time budget ({budget:.0f} s) spent")
            continue
        t = time.perf_counter()
        pipe = build(arch, device)
        flops = count_flops(pipe)
        print(
            f"{label:>7} built in {time.perf_counter() - t:.1f} s; GFLOP at batch 1: transformer forward "
            f"{flops['transformer'] / 1e9:.4g}, VAE decode {flops['decode'] / 1e9:.4g}, "
            f"conditioning (CLIP + VAE encode) {flops['condition'] / 1e9:.4g}"
        )
        image = np.random.default_rng(0).random((arch.resolution, arch.resolution), dtype=np.float32)
        results: dict[str, Result] = {}
        compiled_with: tuple[bool, ...] | None = None
        precision: torch.dtype | None = None
        for s in scenarios(args.views, args.quick, cuda):
            if s.compiled and args.no_compile:
                continue
            if time.perf_counter() - started > budget:
                print(f"{label:>7} {s.name:<30} skipped: time budget ({budget:.0f} s) spent")
                continue
            dtype = torch.float16 if s.half else fast
            if dtype != precision:
                set_precision(pipe, dtype)
                precision = dtype
            try:
                if s.compiled and compiled_with != (s.graphs,):
                    if compiled_with is not None:
                        disable_compile(pipe)
                        torch._dynamo.reset()
                    # aot_eager (the CPU stand-in for Inductor) mis-strides a batch-1 VAE group norm: VAE eager there.
                    fast_path = FastPath(True, backend == "inductor", s.graphs, pad_batches=True, backend=backend)
                    enable_fast_path(pipe, fast_path)
                    compiled_with = (s.graphs,)
                elif not s.compiled:
                    pipe.fast_path = FastPath()
                result = run(pipe, s, image, device, repeats)
            except Exception as e:  # one failing scenario (a compiler missing, out of memory) must not end the run
                print(f"{label:>7} {s.name:<30} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
                if s.compiled:
                    disable_compile(pipe)
                    torch._dynamo.reset()
                    compiled_with = None
                if cuda:
                    torch.cuda.empty_cache()
                continue
            results[s.name] = result
            floor_s = floor_flops(flops, s) / (peak * 1e12)
            public = next((r for k, r in results.items() if k.startswith("public")), None)
            per_view = result.total_s / s.views
            speed_up = f"{public.total_s / public.images.shape[0] / per_view:.2f}" if public else "-"
            delta = "-"
            if s.compare_to in results:
                worst = float(np.abs(result.images - results[s.compare_to].images).max())
                delta = f"{worst:.2e}" + ("!" if worst > TOLERANCE[device.type] else "")
            print(
                COLUMNS.format(
                    label, s.name, s.views, f"{result.total_s:.3f}", f"{per_view:.4f}", f"{result.first_s:.1f}",
                    f"{result.peak_mb:.0f}", f"{floor_s:.4f}", f"{result.total_s / floor_s:.2f}", speed_up, delta,
                    "yes" if result.finite else "NO",
                )  # fmt: skip
            )
            if s.name.startswith("compiled") and s.views == args.views and s.graphs and public:
                summary.append(
                    f"goal {label}: compiled {args.views} views = {result.total_s / floor_s:.2f} x floor (target "
                    f"<= 1.5), {public.total_s / public.images.shape[0] / per_view:.1f} x faster per view than the "
                    "public way (target >= 5)"
                )
                print(summary[-1])
            sys.stdout.flush()
        del pipe
        gc.collect()
        torch._dynamo.reset()
        if cuda:
            torch.cuda.empty_cache()
    if len(summary) > 1:
        print("summary:")
        for line in summary:
            print("  " + line)
    print(f"benchmark took {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
