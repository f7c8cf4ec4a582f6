"""Record every Triton launch of fastvar's real code paths as a GPU makes it, and compile each distinct one
for sm_90 (H100/H200), on a machine without a GPU.

The CPU lane runs the kernels in Triton's interpreter, which never compiles them: a kernel that the
interpreter runs can still fail to compile, or spill registers, in a specialization only the GPU makes.
A hand-picked list of variants misses most of them (recorded from a d16 sample at B = 1: 29 of 32 distinct
launches were not in the old list). So this script drives the real code paths (the Sampler, training
attention forward and backward, the multi-scale encode and the teacher-forcing input) on **meta tensors**:

* shapes, dtypes, strides and storage offsets are the real ones, but no value is computed (the matmuls are
  shape arithmetic); every model has its released width, heads and schedule and two blocks, since every block
  launches the same kernels (so a launch's count is per two blocks);
* every ``kernel[grid](...)`` goes through Triton's own ``JITFunction.run`` with a stand-in driver whose
  target is ``GPUTarget("cuda", 90, 32)``: Triton's binder computes the specialization key the GPU would
  (argument types, a 1 as a constant, multiples of 16 and 16-byte alignment, which a meta tensor reports
  through its storage offset, constexprs, num_warps, num_stages) and hands it to ``jit_cache_hook``, which
  records it and skips the compile;
* the launchers' GPU choices are forced (tile tables, non-interpreter modes, the GPU's SM count), the
  custom ops' meta kernels run the real launchers, and checks that read values back (finite inputs, index
  ranges, bad-row errors, labels, the mask's schedule) are skipped, as under CUDA-graph capture.

Distinct launches (deduplicated by Triton's own cache key) are then compiled for sm_90 with Triton's
bundled ptxas (``JITFunction.preload`` of the recorded specialization: the same compile, and the same cache
entry, as the GPU's first launch), in parallel, and ptxas's registers, spills and shared memory reported, with
the tensor-core instructions of the PTX (Hopper's wgmma, or the older warp-level mma) and ptxas's performance
advisories (serialized wgmma).

    python tests/sm90_compile.py                    # record every path, compile every distinct launch
    python tests/sm90_compile.py --record-only      # the launch table only (seconds)
    python tests/sm90_compile.py --paths "sample d16" --json F   # a subset; records to F
    python tests/sm90_compile.py --all              # also every candidate tile of the attention kernels
    TRITON_CACHE_DIR=D python tests/sm90_compile.py --jobs 16 --launchers   # fill a cache for the first run
                                                                # (on the GPU: the campaign's precompile stage)
    python tests/sm90_compile.py --kernels attn --all           # tile tuning: compile only matching kernels

``$FASTVAR_TRITON_KEY`` names the cache entries with another Python's ``triton_key()``
(scripts/build_triton_cache.sh: the GPU image's Python 3.12, from a CPU machine's 3.11).

Values are never checked here (the interpreter and GPU lanes do that).
"""
import os

os.environ.pop("TRITON_INTERPRET", None)      # before triton is imported: compile, do not interpret

import argparse     # noqa: E402
import contextlib   # noqa: E402
import functools    # noqa: E402
import io           # noqa: E402
import json         # noqa: E402
import re           # noqa: E402
import subprocess   # noqa: E402
import sys          # noqa: E402
import tempfile     # noqa: E402
import time         # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch        # noqa: E402
import triton       # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
SM_COUNT = 132                 # H100 SXM and H200: the lookup's codebook split depends on it
META = torch.device("meta")


# ------------------------------------------------------------------------------------------ recorder
class _Sm90Driver:
    """Stands in for Triton's active driver: the current target is sm_90, device 0, stream 0. Nothing
    launches (the recording hook stops every launch before its compile)."""

    def get_current_target(self):
        return TARGET

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0


@dataclass
class Launch:
    """One distinct launch: a kernel and Triton's cache key of its specialization."""
    kernel: str                           # module.qualname
    key: str                              # Triton's in-process cache key (specialization + options)
    data: str                             # Triton's specialization data (JSON), what ``preload`` compiles
    fn: object = field(repr=False)        # the JITFunction
    paths: List[str] = field(default_factory=list)
    count: int = 0

    def summary(self) -> dict:
        d = json.loads(self.data)
        names = [p.name for p in self.fn.params]
        consts = {names[k[0]]: v for k, v in zip(d["constant_keys"], d["constant_vals"]) if len(k) == 1}
        constexprs = {n: v for n, v in consts.items() if self.fn.params[names.index(n)].is_constexpr}
        ones = sorted(n for n, v in consts.items() if n not in constexprs and v == 1)
        hinted = sorted(names[k[0]] for k, v in zip(d["attrs_keys"], d["attrs_vals"]) if len(k) == 1 and v)
        types = {n: t for n, t in d["signature"].items() if t != "constexpr"}
        return dict(kernel=self.kernel.rsplit(".", 1)[-1], constexprs=constexprs, ones=ones, divisible_by_16=hinted,
                    types=types, num_warps=d["options"]["num_warps"], num_stages=d["options"]["num_stages"],
                    paths=self.paths, launches=self.count)


class Recorder:
    """Collects the launches made while :func:`recording` is active, deduplicated by (kernel, key)."""

    def __init__(self):
        self.launches: Dict[tuple, Launch] = {}
        self.path = "?"

    def hook(self, key, repr, fn, compile, is_manual_warmup, already_compiled):   # noqa: A002 (Triton's names)
        jf = fn.jit_function
        name = f"{jf.fn.__module__}.{jf.fn.__qualname__}"
        launch = self.launches.get((name, key))
        if launch is None:
            launch = self.launches[(name, key)] = Launch(name, key, compile["specialization_data"], jf)
        if self.path not in launch.paths:
            launch.paths.append(self.path)
        launch.count += 1
        return True               # handled: Triton compiles nothing and launches nothing

    def keys(self, path_pattern: str = ".*") -> set:
        """The distinct launches of the paths whose name matches ``path_pattern`` (a regex)."""
        return {k for k, launch in self.launches.items() if any(re.search(path_pattern, p) for p in launch.paths)}


def _custom_ops():
    """fastvar's ``torch.library`` custom ops (every ``CustomOpDef`` in a ``fastvar.ops`` module)."""
    import importlib
    import pkgutil

    import fastvar.ops
    from torch._library.custom_ops import CustomOpDef
    found = []
    for info in pkgutil.iter_modules(fastvar.ops.__path__):
        mod = importlib.import_module(f"fastvar.ops.{info.name}")
        found += [v for v in vars(mod).values() if isinstance(v, CustomOpDef) and v not in found]
    return found


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def recording(recorder: Recorder):
    """Within: fastvar's code runs on meta tensors, making the GPU's launches, which ``recorder`` records."""
    import importlib
    import pkgutil

    from triton import knobs
    from triton.runtime.driver import driver

    import fastvar.ops
    from fastvar.ops import _backend, _checks
    from fastvar.triton_kernels import adaln as N, attention as A, bit_sampling as BS, cross_attention as CA
    from fastvar.triton_kernels import rq_lookup as R, sampling as S, upsample as U

    def triton_on_meta(backend, device):
        if backend == "triton" and torch.device(device).type == "meta":
            return None
        return real_unavailable(backend, device)

    real_unavailable = _backend.unavailable_reason

    def on_gpu(launcher):       # the launchers that take ``interpret=`` (by default: the tensor's device)
        return lambda *args, **kwargs: launcher(*args, **dict(kwargs, interpret=False))

    real_autocast = torch.autocast

    def autocast(device_type, *args, **kwargs):     # autocast has no meta device: the CPU's is a no-op alike
        return real_autocast("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        old_driver = driver._active
        driver.set_active(_Sm90Driver())
        stack.callback(lambda: setattr(driver, "_active", old_driver))
        stack.enter_context(_patched(knobs.runtime, "jit_cache_hook", recorder.hook))
        # the GPU's choices: tiles, modes, SM count
        stack.enter_context(_patched(A, "_gpu_tiles", lambda t: True))
        stack.enter_context(_patched(R, "_interpreting", lambda t: False))
        stack.enter_context(_patched(U, "_interpreting", lambda t: False))
        stack.enter_context(_patched(N, "_interpreting", lambda t: False))
        stack.enter_context(_patched(R, "_sm_count", lambda device: SM_COUNT))
        for mod, name in ((S, "sample_fwd"), (BS, "bit_sampling_fwd"), (CA, "varlen_cross_attention_fwd")):
            stack.enter_context(_patched(mod, name, on_gpu(getattr(mod, name))))
        # the Triton backend on meta tensors, through the custom ops: their meta kernel is the fake
        # implementation; point it at the real one (which launches, i.e. records)
        stack.enter_context(_patched(_backend, "unavailable_reason", triton_on_meta))
        old_env = os.environ.get(_backend.ENV_VAR)
        os.environ[_backend.ENV_VAR] = "triton"
        stack.callback(lambda: os.environ.pop(_backend.ENV_VAR) if old_env is None
                       else os.environ.__setitem__(_backend.ENV_VAR, old_env))
        for op in _custom_ops():
            if not hasattr(op, "_abstract_fn") or not hasattr(op, "_init_fn"):
                raise RuntimeError(f"torch {torch.__version__}: custom op {op} has no _abstract_fn/_init_fn; "
                                   "the recorder needs another way to run the real implementation on meta tensors")
            stack.enter_context(_patched(op, "_abstract_fn", op._init_fn))
        # checks that read values back (a meta tensor has none): skipped, as under CUDA-graph capture
        real_capturing = _checks.capturing
        for info in pkgutil.iter_modules(fastvar.ops.__path__):
            mod = importlib.import_module(f"fastvar.ops.{info.name}")
            for name in ("capturing", "_capturing"):
                if getattr(mod, name, None) is real_capturing:
                    stack.enter_context(_patched(mod, name, lambda t: True))
        stack.enter_context(_patched(torch, "autocast", autocast))
        # torch's meta kernels of linear and gelu are Python decompositions (~10 ms a call): their outputs'
        # shapes and (contiguous) strides directly, which is all a meta tensor holds
        stack.enter_context(_patched(torch.nn.functional, "linear", _meta_linear))
        stack.enter_context(_patched(torch.nn.functional, "gelu", _meta_elementwise))
        import fastvar.labels as labels_module
        import fastvar.models.var as var_module
        import fastvar.nn.attention as nn_attention
        from fastvar.models.infinity import Infinity
        from fastvar.sampler.infinity import InfinityAdapter
        from fastvar.sampler.var import VARAdapter

        def unchecked_labels(labels, num_classes, name="label_B", B=None, device=None):
            return labels.to(device=device, dtype=torch.long)

        for mod in (labels_module, var_module):
            if hasattr(mod, "check_labels"):
                stack.enter_context(_patched(mod, "check_labels", unchecked_labels))
        stack.enter_context(_patched(nn_attention, "schedule_of_mask", lambda bias: _SCHEDULES_BY_L[bias.shape[-1]]))
        for adapter in (VARAdapter, InfinityAdapter):      # the once-per-sample check of the drawn tokens
            stack.enter_context(_patched(adapter, "check_tokens", lambda self, buf: None))
        # the text tuple's offsets are checked against its lengths by value
        stack.enter_context(_patched(Infinity, "check_text", lambda self, text, name="", B=None, need_uncond=False:
                                     (text[0], [int(n) for n in text[1]], text[2], int(text[3]))))
        yield recorder


def _meta_linear(x, weight, bias=None):
    if x.device.type != "meta":
        raise RuntimeError("the recorder's F.linear runs on meta tensors only")
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=x.dtype, device=META)
    if x.requires_grad or weight.requires_grad:        # keep the autograd graph (training paths)
        out = torch.ops.aten.linear(x, weight, bias)
    return out


def _meta_elementwise(x, *args, **kwargs):
    if x.requires_grad:
        return torch.ops.aten.gelu(x, approximate=kwargs.get("approximate", "none"))
    return torch.empty_like(x)


_SCHEDULES_BY_L: Dict[int, tuple] = {}       # L -> scale lengths, for the model's dense mask (no values on meta)


# ------------------------------------------------------------------------------------------ the paths
def _lens(patch_nums):
    from fastvar.schedule import scale_lens
    return tuple(scale_lens(patch_nums))


@functools.lru_cache(maxsize=None)
def meta_model(name: str):
    """``(vae, var)`` of a released size (``fastvar.benchmark.MODELS``) on the meta device, with two of its blocks:
    every block launches the same kernels, so the launches do not depend on the depth (and recording d36 whole
    took 10x longer)."""
    from fastvar import build_vae_var
    from fastvar.benchmark import MODELS
    depth, shared, schedule = MODELS[name]
    with torch.device(META):
        vae, var = build_vae_var(META, patch_nums=schedule, depth=2, shared_aln=shared, fast_init=True,
                                 var_kwargs=dict(embed_dim=64 * depth, num_heads=depth))
    _SCHEDULES_BY_L[var.L] = tuple(var.schedule.lens)
    return vae, var


def sample(model: str, B: int, mode: str = "plain", dtype=torch.bfloat16):
    """A whole ``Sampler`` sample (tokens of every scale; no decode)."""
    from fastvar.sampler import Sampler
    vae, var = meta_model(model)
    sampler = Sampler(var, vae, dtype=dtype, cuda_graphs=False, fused_step_conv=mode == "fused_step_conv")
    for _ in sampler.stream(207, B=B, cfg=1.5, top_k=900, top_p=0.96, more_smooth=mode == "more_smooth"):
        pass


def sample_infinity(pn: str, B: int, dtype=torch.bfloat16):
    """A whole Infinity ``Sampler`` sample at the 2B model's width (C 2048, 16 heads of 128, text 2048; two blocks:
    the launches do not depend on the depth), guided, at the size ``pn`` (1M: 1024 px, 13 scales)."""
    from fastvar import dynamic_resolution
    from fastvar.models import BSQVAE, Infinity
    from fastvar.sampler import Sampler
    with torch.device(META):
        vae = BSQVAE(32, 128, (1, 2, 4, 4, 4), 2)
        model = Infinity(vae, text_maxlen=512, pad_to_multiplier=128, cond_drop_rate=0.0, depth=2, embed_dim=2048,
                         num_heads=16, text_channels=2048, block_chunks=2).eval()
    n = 77          # tokens per prompt
    text = (torch.empty(B * n, 2048, device=META), [n] * B, torch.empty(B + 1, dtype=torch.int32, device=META), n)
    sampler = Sampler(model, vae, dtype=dtype, cuda_graphs=False)
    for _ in sampler.stream(text, B=B, scale_schedule=dynamic_resolution.scale_schedule(1.0, pn), cfg=3.0, tau=0.5,
                            top_k=900, top_p=0.97):
        pass


def train_attention(patch_nums, B: int, H: int, D: int, dtype, norm: bool = True):
    """Training attention through ``fastvar.ops.block_causal_attention``: forward and backward, q/k/v as the
    views of VAR's qkv projection ``(B, L, 3, H, D)``."""
    from fastvar import ops
    lens = _lens(patch_nums)
    qkv = torch.empty(B, sum(lens), 3, H, D, dtype=dtype, device=META, requires_grad=True)
    q, k, v = qkv.unbind(2)
    sm = torch.empty(1, H, 1, 1, device=META, requires_grad=True) if norm else None
    out = ops.block_causal_attention(q, k, v, lens, 1.0 if norm else None, sm)
    out.backward(torch.empty_like(out))


def kv_steps(patch_nums, B: int, H: int, D: int, dtype, norm: bool = True):
    """The KV-cached step of every scale through ``fastvar.ops.kv_cached_attention`` (a model whose width the
    released ones do not have, e.g. D = 128 at 1024 px): q/k/v as views of a ``(2B, l, 3, H, D)`` projection,
    the caches ``(2B, L, H, D)``, as the Sampler holds them."""
    from fastvar import ops
    lens = _lens(patch_nums)
    caches = [torch.empty(2 * B, sum(lens), H, D, dtype=dtype, device=META) for _ in range(2)]
    sm = torch.empty(1, H, 1, 1, device=META) if norm else None
    start = 0
    for n in lens:
        q, k, v = torch.empty(2 * B, n, 3, H, D, dtype=dtype, device=META).unbind(2)
        ops.kv_cached_attention(q, k, v, *caches, start, 1.0 if norm else None, sm)
        start += n


def train_model(model: str, B: int, dtype=torch.bfloat16):
    """Teacher forcing through the whole model (``VAR.forward``) and its backward, weights in ``dtype``."""
    vae, var = meta_model.__wrapped__(model)        # a model of its own: cast and put in training mode here
    var = var.to(dtype).train()
    x = torch.empty(B, var.L - var.first_l, var.Cvae, device=META)
    var(torch.full((B,), 3, dtype=torch.long, device=META), x).float().sum().backward()


def encode(model: str, B: int):
    """``VectorQuantizer2.f_to_idxBl_or_fhat`` (indices, and f_hat after every scale) and
    ``idxBl_to_var_input`` (the teacher-forcing input) at the model's schedule."""
    vae, var = meta_model(model)
    quant = vae.quantize
    H, W = quant.patch_hws[-1]
    f = torch.empty(B, quant.Cvae, H, W, device=META)
    idx = quant.f_to_idxBl_or_fhat(f, to_fhat=False)
    quant.f_to_idxBl_or_fhat(f, to_fhat=True)
    quant.idxBl_to_var_input(idx)


def fast_draw(B: int, l: int, seed: int, offset: int):
    """The fast-mode draw (in-kernel Philox) with an explicit seed and offset."""
    from fastvar import ops
    logits = torch.empty(2 * B, l, 4096, device=META)
    ops.sample_cfg_top_k_top_p(logits, 1.5, 900, 0.96, mode="fast", seed=seed, offset=offset)


VAR_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)     # 13 scales, L = 10521 (tests/test_attention.py)


def _paths() -> Dict[str, Callable[[], None]]:
    from fastvar.schedule import PATCH_NUMS_256, PATCH_NUMS_512
    paths = {}
    for model in ("d16", "d30", "d36"):
        for B in (1, 8, 64):
            for mode in ("plain", "more_smooth", "fused_step_conv"):
                if B == 8 and (mode != "plain" or model == "d36"):
                    continue          # B = 8: the batch-size invariance check of d16 and d30 (test_launch_variants.py)
                paths[f"sample {model} B={B} {mode}"] = functools.partial(sample, model, B, mode)
    paths["sample d16 B=1 float32"] = functools.partial(sample, "d16", 1, "plain", torch.float32)
    for B in (1, 8):
        paths[f"sample infinity-2b 1024px B={B}"] = functools.partial(sample_infinity, "1M", B)
    paths["sample infinity-2b 256px B=1"] = functools.partial(sample_infinity, "0.06M", 1)
    for dtype in (torch.bfloat16, torch.float16):
        paths[f"kv steps 1024px D=128 {str(dtype)[6:]}"] = functools.partial(kv_steps, VAR_1024, 2, 8, 128, dtype)
    for name, pn, B, H, D in (("L=680 d16", PATCH_NUMS_256, 8, 16, 64), ("L=2240 d36", PATCH_NUMS_512, 2, 36, 64),
                              ("L=10521 1024px D=128", VAR_1024, 1, 8, 128)):
        for dtype in (torch.bfloat16, torch.float16):
            for norm in (True, False):
                paths[f"train {name} {str(dtype)[6:]} norm={int(norm)}"] = functools.partial(
                    train_attention, pn, B, H, D, dtype, norm)
    paths["train L=680 d16 float32 norm=1"] = functools.partial(train_attention, PATCH_NUMS_256, 2, 16, 64,
                                                                torch.float32, True)
    paths["train L=680 D=128 float32 norm=1"] = functools.partial(train_attention, PATCH_NUMS_256, 2, 4, 128,
                                                                  torch.float32, True)
    paths["train model d16 bfloat16"] = functools.partial(train_model, "d16", 2)
    for model in ("d16", "d36"):
        for B in (1, 64):
            paths[f"encode {model} B={B}"] = functools.partial(encode, model, B)
    for seed, offset in ((0, 0), (1, 1), (2 ** 40 + 17, 16)):
        paths[f"fast draw seed={seed} offset={offset}"] = functools.partial(fast_draw, 4, 9, seed, offset)
    return paths


def attention_candidate_paths() -> Dict[str, Callable[[], None]]:
    """Every candidate tile of the attention kernels (``--all``), launched as ``bench/bench_attention.py --tiles``
    launches them, on its cases' shapes (the same cache entries: the campaign's tiles stage compiles them on
    every core first), in bf16, fp16 and fp32: the forward and gradient tables on the training cases, the KV
    step's candidates at the last three scales of the sampling cases."""
    import importlib.util
    from fastvar.schedule import Schedule
    from fastvar.triton_kernels import attention as A
    spec = importlib.util.spec_from_file_location(
        "bench_attention", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench",
                                        "bench_attention.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    paths = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for case, (pn, B, H, D) in bench.TRAIN_CASES.items():
            sched = Schedule.of(pn)
            lens, L = sched.lens, sched.L
            for kind in ("fwd", "dkdv", "dq"):
                for tile in A._configs(kind, D, dtype, "cuda", L):
                    def run(B=B, H=H, D=D, lens=lens, L=L, dtype=dtype, kind=kind, tile=tile):
                        q, k, v = torch.empty(B, L, 3, H, D, dtype=dtype, device=META).unbind(2)
                        sm = torch.empty(1, H, 1, 1, device=META)
                        out, stats = A.block_causal_attention_fwd(q, k, v, lens, 1.0, sm,
                                                                  config=tile if kind == "fwd" else None)
                        if kind != "fwd":
                            dout = torch.empty(B, L, H, D, dtype=dtype, device=META)
                            A.block_causal_attention_bwd(dout, q, k, v, out, stats, lens, 1.0, sm, config={kind: tile})
                    paths[f"candidate {case} {kind} {str(dtype)[6:]} {bench.tile_label(tile)}"] = run
        for case, (pn, B, H, D) in bench.KV_CASES.items():
            sched = Schedule.of(pn)
            for s in bench.tile_scales(sched):
                b, e = sched.spans[s]
                for tile in A._kv_candidates(e - b, D, dtype):
                    def step(B=B, H=H, D=D, L=sched.L, b=b, e=e, dtype=dtype, tile=tile):
                        q, k, v = (torch.empty(B, L, H, D, dtype=dtype, device=META) for _ in range(3))
                        caches = torch.empty_like(k), torch.empty_like(v)
                        A.kv_cached_attention_fwd(q[:, b:e], k[:, b:e], v[:, b:e], *caches, b, 1.0,
                                                  torch.empty(1, H, 1, 1, device=META), config=tile)
                    paths[f"candidate {case} kv scale {s} {str(dtype)[6:]} {bench.tile_label(tile)}"] = step
    return paths


def record(pattern: str = ".*", all_configs: bool = False) -> Recorder:
    """Run every path whose name matches ``pattern`` under :func:`recording`; returns the recorder."""
    recorder = Recorder()
    paths = _paths()
    if all_configs:
        paths.update(attention_candidate_paths())
    with recording(recorder):
        for name, run in paths.items():
            if not re.search(pattern, name):
                continue
            recorder.path = name
            run()
    return recorder


# ------------------------------------------------------------------------------------------ compile
def _resources(cubin: bytes) -> dict:
    """Registers and spill bytes per thread from the cubin, via Triton's bundled cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs, stack = re.search(r"REG:(\d+)", out), re.search(r"STACK:(\d+)", out)
    if not (regs and stack):
        raise RuntimeError(f"cuobjdump printed no REG/STACK usage: {out[-400:]!r}")
    # ptxas puts spilled registers on the stack frame (LOCAL stays 0): STACK is the spill size per thread
    return {"registers": int(regs.group(1)), "spill_bytes": int(stack.group(1))}


def _tensor_core_ops(ptx: Optional[str]) -> dict:
    """The tensor-core instructions of the PTX: ``wgmma.mma_async``, Hopper's warpgroup MMA (HGMMA in the SASS), and
    ``mma.sync``, the older warp-level MMA (HMMA), which runs a Hopper's tensor cores at a fraction of their rate.
    None where the cache holds no PTX (a pruned cache: scripts/relocate_triton_cache.py). Read off the PTX, not
    the SASS: nvdisasm takes up to a second per kernel, the PTX is at hand."""
    if ptx is None:
        return {"wgmma": None, "mma_sync": None}
    return {"wgmma": len(re.findall(r"\bwgmma\.mma_async\b", ptx)), "mma_sync": len(re.findall(r"\bmma\.sync\b", ptx))}


def _ptxas_advisories(log: str) -> List[str]:
    """ptxas's performance advisories (``Potential Performance Loss``: serialized wgmma and the like) from its
    ``-v`` log, one line each, without the kernel's name."""
    return [re.sub(r"^.*? info\s*:\s*|\s+in (the function '[^']*'|line \d+)\s*$", "", line)
            for line in log.splitlines() if "Potential Performance Loss" in line]


_TO_COMPILE: List[Launch] = []       # set before the worker processes fork
_BUILD_LAUNCHERS = [False]


def _use_triton_key(key: Optional[str]) -> None:
    """Name cache entries with another Python's ``triton_key()`` (``$FASTVAR_TRITON_KEY``): the key hashes
    libtriton's shared object, which differs between the cp311 and cp312 wheels of one Triton version while
    the compiled kernels do not. scripts/build_triton_cache.sh builds the GPU image's (Python 3.12) cache so."""
    if key:
        import triton.runtime.cache as cache
        cache.triton_key = lambda: key


def _build_launcher(kernel) -> None:
    """The host-side launcher of ``kernel`` (a small C module, built with gcc on first launch and cached):
    built now, in parallel, instead of one by one during the first sample (needs libcuda to link: a GPU
    machine, or $TRITON_LIBCUDA_PATH)."""
    from triton.backends.nvidia.driver import CudaLauncher
    CudaLauncher(kernel.src, kernel.metadata)


def _compile_one(i: int) -> dict:
    from triton import knobs
    from triton.runtime.driver import driver
    launch = _TO_COMPILE[i]
    driver.set_active(_Sm90Driver())
    knobs.runtime.jit_cache_hook = None
    start = time.time()
    try:
        log = io.StringIO()
        with contextlib.redirect_stdout(log), _patched(knobs.nvidia, "dump_ptxas_log", True):
            kernel = launch.fn.preload(launch.data)
        # ptxas ran only on a cache miss: then its -v log (never empty) holds the advisories
        advisories = _ptxas_advisories(log.getvalue()) if "ptxas" in log.getvalue() else None
        out = dict(shared_bytes=kernel.metadata.shared, **_resources(kernel.asm["cubin"]),
                   **_tensor_core_ops(kernel.asm.get("ptx")), ptxas_advisories=advisories)
        if _BUILD_LAUNCHERS[0]:
            _build_launcher(kernel)
    except Exception as e:      # reported per launch; the caller fails on it
        out = dict(error=f"{type(e).__name__}: {str(e)[-2000:]}")
    out["seconds"] = round(time.time() - start, 1)
    return out


def compile_launches(launches: List[Launch], jobs: int, launchers: bool = False) -> List[dict]:
    """Compile every launch for sm_90 (``jobs`` processes); returns their summaries with ptxas's numbers."""
    import concurrent.futures
    import multiprocessing
    _TO_COMPILE[:] = launches
    _BUILD_LAUNCHERS[0] = launchers
    if jobs <= 1:
        results = [_compile_one(i) for i in range(len(launches))]
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as ex:
            results = list(ex.map(_compile_one, range(len(launches))))
    return [dict(launch.summary(), spec=launch.data, **r) for launch, r in zip(launches, results)]


def _mma_label(r: dict) -> str:
    """Which tensor-core instructions a compiled launch uses: ``wgmma``, ``mma`` (warp-level), both, ``-`` (none)
    or ``?`` (no PTX in the cache); then ``!`` when ptxas gave a performance advisory (serialized wgmma, say), ``?``
    when ptxas did not run (a cache hit: no advisory seen)."""
    if r["wgmma"] is None:
        kinds = "?"
    else:
        kinds = "+".join(k for k, n in (("wgmma", r["wgmma"]), ("mma", r["mma_sync"])) if n) or "-"
    advisories = r.get("ptxas_advisories")
    return kinds + ("?" if advisories is None else "!" if advisories else "")


def _fmt(d: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in d.items())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=".*", help="regex: only the paths whose name matches")
    parser.add_argument("--all", action="store_true", help="also every candidate tile of the attention tables")
    parser.add_argument("--kernels", default=".*", help="regex: compile only the kernels whose name matches")
    parser.add_argument("--record-only", action="store_true", help="record and list the launches, compile nothing")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1), help="compile processes")
    parser.add_argument("--json", default=None, help="write the launches (and compile results) to this path")
    parser.add_argument("--list-paths", action="store_true", help="print the path names and exit")
    parser.add_argument("--launchers", action="store_true",
                        help="also build every kernel's host-side launcher into the cache (a GPU machine)")
    args = parser.parse_args(argv)
    if args.list_paths:
        print("\n".join(list(_paths()) + list(attention_candidate_paths())))
        return 0
    start = time.time()
    recorder = record(args.paths, args.all)
    launches = [launch for launch in recorder.launches.values() if re.search(args.kernels, launch.kernel)]
    if not launches:
        print(f"no launch recorded: --paths {args.paths!r} and --kernels {args.kernels!r} match nothing",
              file=sys.stderr)
        return 1
    n_launches = sum(launch.count for launch in launches)
    paths = sorted({p for launch in launches for p in launch.paths})
    print(f"# triton {triton.__version__}, torch {torch.__version__}: {len(paths)} paths, {n_launches} launches, "
          f"{len(launches)} distinct, recorded in {time.time() - start:.1f} s")
    if args.record_only:
        rows = [launch.summary() for launch in launches]
    else:
        t0 = time.time()
        _use_triton_key(os.environ.get("FASTVAR_TRITON_KEY"))
        rows = compile_launches(launches, args.jobs, args.launchers)
        print(f"# compiled for {TARGET} in {time.time() - t0:.0f} s ({args.jobs} processes)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, paths=list(_paths()) if
                           args.paths == ".*" else paths, launches=rows), f, indent=1)
    print(f"{'kernel':40s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill':>5s} {'smem':>6s} {'mma':6s}  "
          f"constexprs / ==1 / first path")
    for r in sorted(rows, key=lambda r: (r["kernel"], str(r["constexprs"]))):
        res = (f"{r['registers']:4d} {r['spill_bytes']:5d} {r['shared_bytes']:6d} {_mma_label(r):6s}"
               if "registers" in r else "   -     -      -" if "error" not in r else " ERROR")
        print(f"{r['kernel'][:40]:40s} {r['num_warps']:5d} {r['num_stages']:6d} {res}  {_fmt(r['constexprs'])}"
              f"{' ones=' + ','.join(r['ones']) if r['ones'] else ''} | {r['paths'][0]}"
              + (f" (+{len(r['paths']) - 1})" if len(r["paths"]) > 1 else ""))
        if "error" in r:
            print("   ", r["error"][-1500:])
        for advisory in r.get("ptxas_advisories") or ():
            print("    ptxas:", advisory)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
