"""The engine's fast path: compiled modules, static batch shapes, CUDA graphs, warm-up, batch sizing.

Everything here is optional and switchable (the node's ``[engine]`` keys ``compile``,
``cuda_graphs``, ``pad_batches``, ``warm_up`` and ``max_batch = "auto"``); the eager path stays the
reference the fast path is tested against.

* **Static shapes.** ``torch.compile(dynamic=False)`` specialises on the batch size, so the
  pipeline denoises views in chunks whose sizes come from a small fixed set (:func:`plan_chunks`):
  full chunks of ``max_batch``; a last, shorter chunk is padded up to the next power of two (never
  beyond ``max_batch``) by repeating its last view, and the padded rows are dropped after decoding.
  Every operation in the transformer and the VAE acts on each row alone, so padding changes no
  view's pixels (tested against the unpadded eager path).
* **Compilation.** ``nn.Module.compile`` in place (the pipeline keeps its stock modules and their
  ``config``): the transformer, and the VAE decoder. On CUDA the transformer runs under CUDA graphs
  (``mode="reduce-overhead"``) when ``cuda_graphs`` is on; the decoder, called once per chunk,
  is compiled without them (its graphs would hold a large activation pool for little gain).
* **Warm-up.** :func:`warm_up` pushes a blank image through every chunk shape the node's rules can
  ask for, so compilation and graph capture happen at model load, not in the first job.
* **Batch sizing.** :func:`auto_max_batch` measures the activation memory of one view (one
  CFG pair through the transformer, one VAE decode) and fits as many views as the free CUDA memory
  allows, with a margin; on the CPU it returns :data:`CPU_AUTO_BATCH`.

Precision is the loader's business (:mod:`synthesis.checkpoint`): bfloat16 throughout on CUDA; an
SDXL-type VAE asked for in float16 stays float32 (it overflows to NaN in half precision), and the
pipeline decodes again in float32 if a decode ever gives non-finite values.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

CPU_AUTO_BATCH = 8  # max_batch = "auto" on the CPU: batching buys little there; memory is rarely the limit
AUTO_BATCH_CAP = 64  # never more views per chunk than this, whatever the memory
AUTO_MEMORY_FRACTION = 0.7  # of the free CUDA memory: the rest is for graph pools, workspaces, fragmentation
WARM_UP_STEPS = 3  # compiled CUDA graphs are recorded on the second or third call of a shape
COMPILE_CACHE_LIMIT = 64  # recompilations allowed per module: one per chunk shape and CFG on/off


@dataclass(frozen=True)
class FastPath:
    """How the pipeline runs. ``FastPath()`` is the eager reference (no compilation, no padding)."""

    compile: bool = False  # torch.compile the transformer
    compile_vae: bool = True  # ... and the VAE decoder, when ``compile``
    cuda_graphs: bool = True  # CUDA graphs for the compiled transformer (CUDA only)
    pad_batches: bool = False  # static chunk shapes: pad the last chunk (see plan_chunks)
    backend: Any = "inductor"  # torch.compile backend (name or callable); tests use "aot_eager"

    @classmethod
    def for_device(
        cls,
        device: torch.device | str,
        compile: str | bool = "auto",
        cuda_graphs: bool = True,
        pad_batches: bool = True,
    ) -> FastPath:
        """The settings a node uses: ``compile`` "auto" means on CUDA only (CPU compiles are slow).

        Padding only pays when compiling (it saves recompiles); eager, it would only add rows.
        """
        device = torch.device(device)
        if isinstance(compile, str):
            if compile not in ("auto", "on", "off"):
                raise ValueError(f"compile must be auto, on or off, got {compile!r}")
            compile = device.type == "cuda" if compile == "auto" else compile == "on"
        return cls(compile=compile, cuda_graphs=cuda_graphs, pad_batches=pad_batches and compile)


def enable_fast_path(pipe: Any, fast: FastPath) -> None:
    """Switch ``pipe`` (an :class:`~synthesis.pipeline.SvdrrPipeline` on its final device) to ``fast``.

    Call once, after ``pipe.to(device)``. Compiling is lazy: the first call of each shape compiles.
    """
    device = pipe._execution_device
    cuda = device.type == "cuda"
    graphs = bool(fast.compile and fast.cuda_graphs and cuda and fast.backend == "inductor")
    if cuda:
        # TF32 for any float32 matmul/conv left (a float32 VAE); cuDNN picks the fastest conv kernels.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        if pipe.vae is not None:
            pipe.vae.to(memory_format=torch.channels_last)
    if fast.compile:
        _raise_recompile_limit()
        pipe.transformer.compile(**_compile_kwargs(fast.backend, "reduce-overhead" if graphs else None))
        if fast.compile_vae and pipe.vae is not None:
            pipe.vae.decoder.compile(**_compile_kwargs(fast.backend, None))
    pipe.fast_path = fast
    pipe.cuda_graphs = graphs
    logger.info(
        "fast path on %s: compile %s (backend %s, VAE decoder %s), CUDA graphs %s, padded batches %s",
        device,
        fast.compile,
        fast.backend,
        fast.compile and fast.compile_vae and pipe.vae is not None,
        graphs,
        fast.pad_batches,
    )


def _compile_kwargs(backend: str, mode: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"backend": backend, "dynamic": False}
    if backend == "inductor" and mode is not None:
        kwargs["mode"] = mode  # other backends take no mode
    return kwargs


def _raise_recompile_limit() -> None:
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # renamed in torch 2.6; older names kept
        if hasattr(config, name) and getattr(config, name) < COMPILE_CACHE_LIMIT:
            setattr(config, name, COMPILE_CACHE_LIMIT)


# ------------------------------------------------------------------------------------ chunks
def bucket(n: int, max_batch: int) -> int:
    """The padded size of a chunk of ``n`` views: the next power of two, at most ``max_batch``."""
    return min(max_batch, 1 << max(0, n - 1).bit_length())


def plan_chunks(n_views: int, max_batch: int, pad: bool) -> list[tuple[range, int]]:
    """Chunks of view indices and the batch size each runs at (>= its length when padded).

    Without padding: consecutive chunks of ``max_batch`` and a shorter last one. With padding the
    chunk size is ``bucket(n_views, max_batch)``; a shorter last chunk runs at
    ``bucket(len(last), max_batch)``. So the shapes a compiled module sees are powers of two and
    ``max_batch``, a handful per resolution.
    """
    if n_views < 1 or max_batch < 1:
        raise ValueError(f"need n_views >= 1 and max_batch >= 1, got {n_views}, {max_batch}")
    size = bucket(n_views, max_batch) if pad else max_batch
    chunks = []
    for start in range(0, n_views, size):
        indices = range(start, min(start + size, n_views))
        chunks.append((indices, bucket(len(indices), size) if pad else len(indices)))
    return chunks


def chunk_shapes(view_counts: Iterable[int], max_batch: int, pad: bool) -> list[int]:
    """Every batch size the chunks of requests with these view counts run at, ascending."""
    return sorted({size for n in view_counts if n > 0 for _, size in plan_chunks(n, max_batch, pad)})


# ----------------------------------------------------------------------------------- warm-up
def warm_up(
    pipe: Any,
    batch_sizes: Sequence[int],
    guidance_scale: float,
    steps: int = WARM_UP_STEPS,
) -> float:
    """Run a blank image through each batch size (compiles, captures graphs); returns seconds.

    Each size runs as exactly one chunk (``max_batch`` = the size), so it compiles exactly the
    shape jobs will use. Nothing it makes is kept.
    """
    t0 = time.perf_counter()
    side = pipe.resolution
    image = np.full((side, side), 0.5, dtype=np.float32)
    for size in sorted(set(batch_sizes)):
        t = time.perf_counter()
        pipe(
            image,
            azimuths=list(np.linspace(-90.0, 90.0, size)),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=0,
            max_batch=size,
        )
        _synchronize(pipe._execution_device)
        logger.info("warm-up: batch %d at %d px in %.1f s", size, side, time.perf_counter() - t)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------ batch sizing
def auto_max_batch(pipe: Any, guidance_scale: float, cap: int = AUTO_BATCH_CAP) -> int:
    """``max_batch = "auto"``: as many views per chunk as fit in the free device memory.

    On CUDA the activation memory of one view is measured (eagerly, at the native resolution):
    one transformer forward of its CFG pair and one VAE decode; the free memory (the driver's free
    memory plus what PyTorch's allocator has cached but not used) times
    :data:`AUTO_MEMORY_FRACTION`, over that, rounded down to a power of two, within 1..``cap``.
    On the CPU: :data:`CPU_AUTO_BATCH`.
    """
    device = pipe._execution_device
    if device.type != "cuda":
        return min(cap, CPU_AUTO_BATCH)
    per_view = view_memory_bytes(pipe, guidance_scale)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    n = batch_that_fits(free, per_view, cap)
    logger.info(
        "max_batch auto: %.0f MiB per view, %.0f MiB free -> %d views per chunk", per_view / 2**20, free / 2**20, n
    )
    return n


def batch_that_fits(free_bytes: int, per_view_bytes: int, cap: int = AUTO_BATCH_CAP) -> int:
    """Views per chunk in ``free_bytes`` x :data:`AUTO_MEMORY_FRACTION`: a power of two in 1..cap."""
    fit = int(free_bytes * AUTO_MEMORY_FRACTION // max(per_view_bytes, 1))
    n = max(1, min(cap, fit))
    return 1 << (n.bit_length() - 1)  # a power of two: one of the padded chunk shapes


def view_memory_bytes(pipe: Any, guidance_scale: float) -> int:
    """Peak activation bytes of one view on CUDA: the larger of its transformer forward and decode.

    Calls the modules' ``forward`` directly, so a compiled module is not compiled for batch 1.
    """
    device = pipe._execution_device
    side = pipe.resolution // pipe.vae_scale_factor
    c = pipe.latent_channels
    rows = 2 if guidance_scale > 1.0 else 1
    dtype = pipe.transformer.dtype
    peaks = []
    with torch.inference_mode():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        x = torch.zeros(rows, 2 * c, side, side, device=device, dtype=dtype)
        ctx = torch.zeros(rows, 1, pipe.transformer.config.cross_attention_dim, device=device, dtype=dtype)
        t = torch.zeros(rows, device=device, dtype=torch.long)
        pipe.transformer.forward(
            x, encoder_hidden_states=ctx, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}
        )
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
        del x, ctx, t
        if pipe.vae is not None:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            z = torch.zeros(1, c, side, side, device=device, dtype=pipe.vae.dtype)
            if getattr(pipe.vae.config, "use_post_quant_conv", True) and pipe.vae.post_quant_conv is not None:
                z = pipe.vae.post_quant_conv(z)
            pipe.vae.decoder.forward(z)
            torch.cuda.synchronize(device)
            peaks.append(torch.cuda.max_memory_allocated(device) - base)
    return int(max(peaks))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare_for_serving(
    pipe: Any,
    fast: FastPath,
    max_batch: int | str,
    guidance_scale: float,
    view_counts: Iterable[int],
    warm: bool = True,
) -> tuple[int, float]:
    """Everything a node does after loading a model: fast path, batch size, warm-up.

    Returns ``(max_batch, warm_up_seconds)``; ``max_batch`` resolved from "auto".
    """
    enable_fast_path(pipe, fast)
    n = auto_max_batch(pipe, guidance_scale) if max_batch == "auto" else int(max_batch)
    seconds = 0.0
    if warm:
        shapes = chunk_shapes(view_counts, n, fast.pad_batches) or [min(n, CPU_AUTO_BATCH)]
        try:
            seconds = warm_up(pipe, shapes, guidance_scale)
        except Exception:  # a compiler failure must not cost the node its engine: fall back to eager
            if not fast.compile:
                raise
            logger.exception("warm-up of the compiled path failed; the engine runs eagerly")
            disable_compile(pipe)
    return n, seconds


def disable_compile(pipe: Any) -> None:
    """Back to the eager modules (the compiled call is dropped; weights are shared, nothing reloads)."""
    for module in (pipe.transformer, pipe.vae.decoder if pipe.vae is not None else None):
        if module is not None:
            module._compiled_call_impl = None
    pipe.fast_path = replace(pipe.fast_path, compile=False)
    pipe.cuda_graphs = False
