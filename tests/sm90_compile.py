"""Compile fastvar's Triton kernels for sm_90 (H100/H200) on a machine without a GPU.

The CPU lane runs the kernels in Triton's interpreter, which never compiles them: a kernel that the
interpreter runs can still fail to compile (a type the compiler rejects, a shape ``tl.dot`` cannot take)
or spill registers in a configuration only the GPU uses. This script drives the real launchers with CPU
tensors, but every ``kernel[grid](...)`` compiles for ``GPUTarget("cuda", 90, 32)`` with Triton's bundled
ptxas instead of launching, with the launch configurations the GPU uses (the Hopper tile tables, the
non-interpreter tile sizes and modes). It reports registers, spill bytes and shared memory per variant.

    python tests/sm90_compile.py            # the default configuration of every kernel and mode
    python tests/sm90_compile.py --all      # every entry of the attention tile tables as well
    python tests/sm90_compile.py --json F   # also write the records (tests/test_sm90_compile.py)

Argument specialisation follows Triton's launcher: integer arguments equal to 1 become the constant 1,
pointers (16-byte aligned) and integers divisible by 16 are marked divisible by 16. The outputs of the
launchers are never computed; nothing here checks values (the interpreter tests and the GPU lane do).
"""
import os

os.environ.pop("TRITON_INTERPRET", None)      # before triton is imported: compile, do not interpret

import argparse     # noqa: E402
import json         # noqa: E402
import re           # noqa: E402
import subprocess   # noqa: E402
import sys          # noqa: E402
import tempfile     # noqa: E402
import time         # noqa: E402
from contextlib import contextmanager  # noqa: E402

import torch        # noqa: E402
import triton       # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource           # noqa: E402
from triton.runtime.jit import JITFunction      # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")

RECORDS = []          # one dict per compiled variant
_variant = {"name": "?"}


@contextmanager
def variant(name: str):
    """Names the kernels compiled inside the block (the launcher call being checked)."""
    _variant["name"] = name
    try:
        yield
    finally:
        _variant["name"] = "?"


def _arg_type(name, value):
    if isinstance(value, torch.Tensor):
        if value.dtype not in POINTER_TYPES:
            raise TypeError(f"argument {name}: no pointer type for {value.dtype}")
        return POINTER_TYPES[value.dtype], value.data_ptr() % 16 == 0
    if isinstance(value, bool):
        return "i1", False
    if isinstance(value, int):
        return ("i32" if -2**31 <= value < 2**31 else "i64"), value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"argument {name}: cannot type {type(value).__name__} {value!r}")


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


def compile_instead_of_launch(self, *args, grid, warmup, **kwargs):
    """``JITFunction.run`` replacement: type and specialise the arguments, compile for sm_90, record."""
    options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
    values = dict(zip([p.name for p in self.params], args))
    values.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(self.params):
        if p.name not in values:
            if not p.has_default:
                raise TypeError(f"{self.__name__}: missing argument {p.name}")
            values[p.name] = p.default
        value = values[p.name]
        if p.is_constexpr or value is None:
            signature[p.name], constexprs[(i,)] = "constexpr", value
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value == 1 and not p.do_not_specialize:
            signature[p.name], constexprs[(i,)] = "constexpr", 1     # as Triton's launcher specialises
            continue
        signature[p.name], divisible = _arg_type(p.name, value)
        if divisible and not p.do_not_specialize and not p.do_not_specialize_on_alignment:
            attrs[(i,)] = [["tt.divisibility", 16]]
    start = time.time()
    kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=TARGET, options=options)
    shown = {self.params[path[0]].name: v for path, v in constexprs.items()
             if self.params[path[0]].is_constexpr and self.params[path[0]].name not in ("DOT_PREC",)}
    RECORDS.append(dict(variant=_variant["name"], kernel=self.__name__, constexprs=shown,
                        num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                        shared_bytes=kernel.metadata.shared, seconds=round(time.time() - start, 1),
                        **_resources(kernel.asm["cubin"])))
    return kernel


# ------------------------------------------------------------------------------------------- cases
def attention_cases(all_configs: bool):
    from fastvar.triton_kernels import attention as A
    cuda = torch.device("cuda")
    scale_lens = [1, 4, 9, 16, 25, 36, 64, 100]               # L = 255: ragged, mixed full/masked tiles
    L = sum(scale_lens)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for D in (64, 128):
            for norm in (False, True):
                if dtype == torch.float16 and norm:
                    continue                                   # fp16 and bf16 compile the same code
                B, H = 2, 3
                qkv = torch.randn(B, L, 3, H, D).to(dtype)     # VAR's qkv view: non-contiguous q, k, v
                q, k, v = qkv.unbind(2)
                sm = torch.zeros(H) if norm else None
                tag = f"{str(dtype).split('.')[-1]} D={D} norm={int(norm)}"
                out, stats = torch.empty_like(q), torch.empty(3 if norm else 2, B, H, L)   # never read
                for kind in ("fwd", "dkdv", "dq"):
                    configs = A._configs(kind, D, dtype, cuda)
                    for n, config in enumerate(configs if all_configs else configs[:1]):
                        first = len(RECORDS)
                        with variant(f"attention {kind} {tag} config={config}"):
                            if kind == "fwd":
                                A.block_causal_attention_fwd(q, k, v, scale_lens, D ** -0.5, sm, config=config)
                            else:
                                A.block_causal_attention_bwd(torch.randn_like(q), q, k, v, out, stats, scale_lens,
                                                             D ** -0.5, sm, config=config)
                        # an explicit config goes to both gradient kernels: keep the one it is for (and the
                        # preprocess kernel once)
                        keep = {"fwd": "fwd", "dkdv": "dkdv" if n else "(dkdv|preprocess)", "dq": "dq"}[kind]
                        RECORDS[first:] = [r for r in RECORDS[first:] if re.search(f"_{keep}_kernel", r["kernel"])]
                for l in (1, 16, 36, 256):                      # every KV-step query tile size
                    cache = torch.zeros(B, L + l, H, D, dtype=dtype)
                    qs = qkv[:, :l].unbind(2)
                    with variant(f"kv step {tag} l={l}"):
                        A.kv_cached_attention_fwd(*qs, cache, cache.clone(), L, D ** -0.5, sm,
                                                  config=A._kv_config(l, D, dtype, cuda))


def quantizer_cases():
    from fastvar.triton_kernels import rq_lookup as R, upsample as U
    R._interpreting = U._interpreting = lambda t: False      # the GPU's tile sizes and modes
    V, B = 4096, 2
    for C in (8, 32, 64):
        z = torch.randn(300, C)[:, :C]
        cb = torch.randn(V, C)
        for split, codes in ((1, True), (4, False)):
            with variant(f"rq_lookup C={C} split={split} codes={int(codes)}"):
                R.rq_lookup(z, cb, (z * z).sum(1), (cb * cb).sum(1), return_codes=codes, split=split)
    C, H, W = 32, 16, 16
    cb = torch.randn(V, C)
    idx = torch.randint(0, V, (B, 5, 5))
    with variant("bicubic from indices 5x5->16x16"):
        U.bicubic_upsample(None, (H, W), idx=idx, codebook=cb, out=torch.empty(B, C, H, W))
    with variant("gather indices 16x16"):
        U.bicubic_upsample(None, (H, W), idx=torch.randint(0, V, (B, H, W)), codebook=cb,
                           out=torch.empty(B, C, H, W))
    with variant("bicubic from a map 5x5->16x16"):
        U.bicubic_upsample(torch.randn(B, C, 5, 5), (H, W), out=torch.empty(B, C, H, W))
    with variant("area 16x16->5x5"):
        U.area_downsample(torch.randn(B, C, H, W), (5, 5))
    u = torch.randn(B, C, H, W)
    with variant("phi accumulate + next scale"):
        U.phi_accumulate(u, torch.randn_like(u), 0.5, f_out=torch.randn_like(u), f_in=torch.randn_like(u),
                         next_size=(6, 6), next_out=torch.empty(B, C, 6, 6))
    with variant("phi accumulate, identity Phi, last scale"):
        U.phi_accumulate(u, None, 0.5, f_out=torch.randn_like(u), f_in=torch.randn_like(u))
    w, bias = torch.randn(C, C, 3, 3), torch.randn(C)
    for precision in ("ieee", "tf32"):
        with variant(f"fused step from indices 5x5->16x16 {precision}"):
            U.upsample_phi_accumulate(torch.randn(B, C, H, W), None, w, bias, 0.5, idx=idx, codebook=cb,
                                      dot_precision=precision)
        with variant(f"fused step from a map 5x5->16x16 {precision}"):
            U.upsample_phi_accumulate(torch.randn(B, C, H, W), torch.randn(B, C, 5, 5), w, bias, 0.5,
                                      dot_precision=precision)
    for precision in ("ieee", "tf32"):
        with variant(f"fused step C=64 from indices 16x16 {precision}"):
            U.upsample_phi_accumulate(torch.randn(B, 64, H, W), None, torch.randn(64, 64, 3, 3), torch.randn(64), 0.5,
                                      idx=torch.randint(0, V, (B, H, W)), codebook=torch.randn(V, 64),
                                      dot_precision=precision)
        with variant(f"fused step C=64 from indices 5x5->16x16 {precision}"):
            U.upsample_phi_accumulate(torch.randn(B, 64, H, W), None, torch.randn(64, 64, 3, 3), None, 0.5,
                                      idx=idx, codebook=torch.randn(V, 64), dot_precision=precision)
    with variant("fused step, identity Phi"):
        U.upsample_phi_accumulate(torch.randn(B, C, H, W), None, None, None, 0.0, idx=idx, codebook=cb)


def sampling_cases():
    from fastvar.triton_kernels import sampling as S
    V, B, l = 4096, 2, 9
    for dtype in (torch.bfloat16, torch.float32):
        logits = torch.randn(2 * B, l, V).to(dtype)
        for fast in (False, True):
            for filtered in (False, True):
                rows = B * l
                tokens, err = torch.empty(rows, dtype=torch.int64), torch.empty(rows, dtype=torch.int32)
                noise = None if fast else torch.empty(rows, V).exponential_()
                name = f"sample {str(dtype).split('.')[-1]} {'fast' if fast else 'exact'} filtered={int(filtered)}"
                with variant(name + " cfg+top-k+top-p"):
                    S.sample_fwd(logits, tokens, err, B, 2.0, 1.0, 900, 0.04, noise=noise, seed=3,
                                 filtered=torch.empty(rows, V) if filtered else None, has_cfg=True,
                                 has_top_k=True, has_top_p=True, interpret=False)
        with variant(f"sample {str(dtype).split('.')[-1]} fast, seed from a device tensor, no cfg"):
            S.sample_fwd(logits[:B], tokens, err, B, 1.0, 0.0, 0, 0.0, seed_offset=torch.zeros(2, dtype=torch.int64),
                         interpret=False)


def adaln_cases():
    from fastvar.triton_kernels import adaln as N
    for dtype in (torch.bfloat16, torch.float32):
        for C in (1024, 1920):                              # d16, d30 widths
            x = torch.randn(2 * 36, C).to(dtype)            # 2 samples of 36 tokens
            scale, shift, gamma = torch.randn(3, 2, C).to(dtype).unbind(0)
            with variant(f"adaln {str(dtype).split('.')[-1]} C={C}"):
                N.adaln_fwd(x, scale, shift, 1e-6, h=torch.empty_like(x))
            with variant(f"adaln + gated residual {str(dtype).split('.')[-1]} C={C}"):
                N.adaln_fwd(x, scale, shift, 1e-6, y=torch.randn_like(x), gamma=gamma, h=torch.empty_like(x),
                            x_new=torch.empty_like(x))


def infinity_cases():
    """Infinity's kernels at the 2B/8B sizes: the bit sampler (the 1024 px last scale, 64 x 64 tokens of 32 bits;
    the 8B patchify layout) and the varlen cross-attention (image blocks at D=128, the 8B text pool at D=224)."""
    from fastvar.triton_kernels import bit_sampling as BS, cross_attention as CA
    B = 2
    for dtype in (torch.bfloat16, torch.float32):
        name = str(dtype).split(".")[-1]
        for (h, w, d, patchify) in ((64, 64, 32, False), (45, 90, 14, True)):
            n = h * w * d * (4 if patchify else 1)
            logits = torch.randn(2 * B, n, 2).to(dtype)
            noise = torch.empty(B * n, 2).exponential_()
            bits, err = torch.empty(B * n, dtype=torch.uint8), torch.empty(B * n, dtype=torch.int32)
            with variant(f"bit sampling {name} d={d} patchify={int(patchify)} cfg+top-p+codes"):
                BS.bit_sampling_fwd(logits, noise, bits, err, B, 2.0, 3.0, -2.0, 0.03, has_cfg=True, has_top_p=True,
                                    codes=torch.empty(B * n), code=0.17, w=w, d_t=n // (h * w), d=d,
                                    patchify=patchify, interpret=False)
        with variant(f"bit sampling {name} top-k 1, no cfg, bits only"):
            BS.bit_sampling_fwd(logits[:B], noise, bits, err, B, 1.0, top_k1=True, interpret=False)
        H = 2
        for D, lq, lk in ((128, 4096, 300), (224, 1, 512)):
            q = torch.randn(B * lq, H, D).to(dtype)
            k, v = torch.randn(B * lk, 2, H, D).to(dtype).unbind(1)
            cu_q = torch.arange(0, (B + 1) * lq, lq, dtype=torch.int32)
            cu_k = torch.arange(0, (B + 1) * lk, lk, dtype=torch.int32)
            with variant(f"cross attention {name} D={D} Lq={lq} Lk={lk}"):
                CA.varlen_cross_attention_fwd(q, k, v, cu_q, cu_k, lq, lk, D ** -0.5, interpret=False)


def kv_rope_cases():
    """Infinity's KV step with the 2D RoPE and the q/k norm fused (the append kernel, then the attention kernel with
    the rotation in its prologue) at head dim 128, on the Infinity block's cache layout ``(B, H, capacity, D)``
    (strided views), for the query tile sizes of the 1024 px schedule (1 ... 64 x 64 tokens)."""
    from fastvar.triton_kernels import attention as A
    cuda = torch.device("cuda")
    B, H, L = 2, 2, 6377                            # the 1024 px schedule's tokens before its last scale
    cases = [(torch.bfloat16, 128, True, l) for l in (1, 16, 144, 4096)] + [
        (torch.bfloat16, 128, False, 256), (torch.bfloat16, 64, True, 36), (torch.float32, 128, True, 256)]
    for dtype, D, norm, l in cases:
        qkv = torch.randn(B, l, 3, H, D).to(dtype)
        cache = torch.zeros(B, H, L + l, D, dtype=dtype).transpose(1, 2)
        rope = torch.randn(2, L + l, D // 2)[:, L:]
        sm = torch.zeros(H) if norm else None
        with variant(f"kv rope step {str(dtype).split('.')[-1]} D={D} norm={int(norm)} l={l}"):
            A.kv_cached_attention_fwd(*qkv.unbind(2), cache, cache.clone(), L, 1.0, sm,
                                      config=A._kv_config(l, D, dtype, cuda), rope=rope)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--all", action="store_true", help="every attention tile configuration, not the first")
    parser.add_argument("--json", default=None, help="write the records to this path")
    args = parser.parse_args(argv)
    JITFunction.run = compile_instead_of_launch
    start = time.time()
    with torch.no_grad():
        attention_cases(args.all)
        quantizer_cases()
        sampling_cases()
        adaln_cases()
        infinity_cases()
        kv_rope_cases()
    print(f"# triton {triton.__version__}, target {TARGET}, {len(RECORDS)} kernels in {time.time() - start:.0f} s")
    print(f"{'variant':62s} {'kernel':40s} {'warps':>5s} {'stages':>6s} {'regs':>4s} {'spill':>5s} {'smem':>6s}")
    for r in RECORDS:
        print(f"{r['variant'][:62]:62s} {r['kernel'][:40]:40s} {r['num_warps']:5d} {r['num_stages']:6d} "
              f"{r['registers']:4d} {r['spill_bytes']:5d} {r['shared_bytes']:6d}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, records=RECORDS), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
