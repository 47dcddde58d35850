"""Engine speed and memory: latency per view, peak memory, and the distance to the compute floor.

    python benchmarks/synthesis.py                       # tiny model on the CPU
    python benchmarks/synthesis.py --arch published      # 256/512/1024 px full-size, needs CUDA

Weights are random (speed does not depend on their values); nothing here is a model to use.
The compute floor of one request is

    transformer FLOPs per forward (batch 1) x steps x (2 with CFG) x views + VAE decode FLOPs x views

over the device's peak (``--peak-tflops``; on CPU a measured float32 GEMM rate). FLOPs are counted
by ``torch.utils.flop_counter`` on real forwards, so they follow the architecture actually built.
Scenarios: batched (all views in one loop) vs one view per call; 20 vs 50 steps; CFG on and off; the
goal's reference is one view per call, fp16, 30 steps.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from synthesis.architecture import Architecture, build_components, published, tiny  # noqa: E402
from synthesis.pipeline import SvdrrPipeline  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) of common cards, for the floor when not given.
KNOWN_PEAKS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0}


@dataclass
class Scenario:
    name: str
    views: int
    steps: int
    guidance: float
    per_call: bool
    dtype: torch.dtype


def peak_tflops(device: torch.device, given: float | None) -> float:
    if given:
        return given
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in KNOWN_PEAKS.items():
            if key in name:
                return value
        raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops")
    a = torch.randn(1024, 1024)
    b = torch.randn(1024, 1024)
    a @ b
    t = time.perf_counter()
    reps = 20
    for _ in range(reps):
        a @ b
    return 2 * 1024**3 * reps / (time.perf_counter() - t) / 1e12


def count_flops(pipe: SvdrrPipeline) -> tuple[float, float]:
    """FLOPs of one transformer forward and one VAE decode, batch 1, at the native resolution."""
    device, dtype = pipe._execution_device, pipe.transformer.dtype
    side = pipe.resolution // pipe.vae_scale_factor
    c = pipe.latent_channels
    x = torch.zeros(1, 2 * c, side, side, device=device, dtype=dtype)
    ctx = torch.zeros(1, 1, pipe.transformer.config.cross_attention_dim, device=device, dtype=dtype)
    t = torch.zeros(1, device=device, dtype=torch.long)
    kw = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        pipe.transformer(x, encoder_hidden_states=ctx, timestep=t, **kw)
    transformer = float(counter.get_total_flops())
    vae = 0.0
    if pipe.vae is not None:
        z = torch.zeros(1, c, side, side, device=device, dtype=pipe.vae.dtype)
        with torch.inference_mode(), FlopCounterMode(display=False) as counter:
            pipe.vae.decode(z)
        vae = float(counter.get_total_flops())
    return transformer, vae


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(pipe: SvdrrPipeline, s: Scenario, image: np.ndarray, device: torch.device) -> tuple[float, float]:
    azimuths = list(np.linspace(-90, 90, s.views))
    calls = [[a] for a in azimuths] if s.per_call else [azimuths]
    n = len(azimuths)

    def once() -> None:
        for az in calls:
            pipe(
                image,
                azimuths=az,
                num_inference_steps=s.steps,
                guidance_scale=s.guidance,
                generator=0,
                max_batch=n,
            )

    once()  # warm-up: kernels, allocator, cudnn autotune
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t = time.perf_counter()
    once()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, peak_memory_mb(device)


def build(arch: Architecture, device: torch.device, dtype: torch.dtype) -> SvdrrPipeline:
    components = build_components(arch)
    pipe = SvdrrPipeline(**components)
    pipe.transformer.to(dtype)
    pipe.cc_projection.to(dtype)
    if pipe.image_encoder is not None:
        pipe.image_encoder.to(dtype)
    if pipe.vae is not None:
        # As the loader does: an fp16 SDXL VAE stays fp32 (force_upcast); bf16 runs in bf16.
        pipe.vae.to(torch.float32 if dtype == torch.float16 else dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "published"], default="tiny")
    ap.add_argument("--resolutions", default="256,512,1024", help="published sizes to run (CUDA)")
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak for the floor")
    ap.add_argument("--quick", action="store_true", help="only the goal scenarios")
    args = ap.parse_args(argv)
    diffusers_logging.set_verbosity_error()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.arch == "published" and device.type != "cuda":
        print("published sizes need CUDA; none here. Run --arch tiny on the CPU.")
        return 2
    fast = torch.bfloat16 if device.type == "cuda" else torch.float32
    half_ref = torch.float16 if device.type == "cuda" else torch.float32
    peak = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()}"
    print(f"device: {name}; peak used for the floor: {peak:.1f} TFLOP/s; torch {torch.__version__}")

    archs = [tiny(64)] if args.arch == "tiny" else [published(int(r)) for r in args.resolutions.split(",")]
    n = args.views
    print(
        "{:>10} {:<34} {:>9} {:>8} {:>9} {:>9} {:>8}".format(
            "arch", "scenario", "total s", "s/view", "peak MB", "floor s", "x floor"
        )
    )
    for arch in archs:
        scenarios = [
            Scenario(f"batched {n}v 20st CFG", n, 20, 3.0, False, fast),
            Scenario(f"per-call {n}v 30st CFG fp16", n, 30, 3.0, True, half_ref),
        ]
        if not args.quick:
            scenarios += [
                Scenario(f"batched {n}v 50st CFG", n, 50, 3.0, False, fast),
                Scenario(f"batched {n}v 20st no-CFG", n, 20, 1.0, False, fast),
                Scenario(f"per-call {n}v 20st CFG", n, 20, 3.0, True, fast),
            ]
        image = np.random.default_rng(0).random((arch.resolution, arch.resolution), dtype=np.float32)
        results = {}
        for s in scenarios:
            pipe = build(arch, device, s.dtype)
            f_tr, f_vae = count_flops(pipe)
            floor = (f_tr * s.steps * (2 if s.guidance > 1 else 1) * s.views + f_vae * s.views) / (
                peak * 1e12
            )
            total, mem = run(pipe, s, image, device)
            results[s.name] = total
            label = f"{arch.resolution}px" if args.arch == "published" else f"tiny{arch.resolution}"
            print(
                f"{label:>10} {s.name:<34} {total:9.3f} {total / s.views:8.4f} {mem:9.0f} {floor:9.4f} "
                f"{total / floor:8.2f}"
            )
            del pipe
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        fast_s, ref_s = results[scenarios[0].name], results[scenarios[1].name]
        print(
            f"{'':>10} speed-up of batched 20st bf16 over per-call 30st fp16: {ref_s / fast_s:.2f}x per view"
        )
        print(f"{'':>10} transformer GFLOP/forward {f_tr / 1e9:.2f}; VAE decode GFLOP/view {f_vae / 1e9:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
