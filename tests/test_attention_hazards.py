"""Attention hazards that only large sizes, fp16 or a GPU show: int32 pointer offsets, fp16 overflow in the
L2-norm backward, and tile choices that must be deterministic and safe inside CUDA-graph capture.

Each has a GPU-lane test (``gpu``) at the size where it bites and, where a CPU can show it, a CPU-side test:
the interpreter computes in the kernel's own integer and float types, so it wraps and overflows as the GPU
does. (The pinned tiles are checked on CPU by tests/test_launch_variants.py::test_training_tiles_are_pinned.)
"""
import hashlib
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fastvar.ops import attention as op_attention
from fastvar.reference import attention as ref
from tolerances import REL, assert_like_eager, rel_err

HERE = os.path.dirname(os.path.abspath(__file__))
VAR_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
VAR_1024 = (1, 2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)       # 13 scales, L = 10521


def lens_of(patch_nums):
    return tuple(p * p for p in patch_nums)


# ------------------------------------------------------------------ int32 pointer offsets
# A sequence-outer view (row stride B*H*D) of 18 rows 2^27 elements apart in one 4 GiB fp16 allocation (only
# the pages of those rows are ever touched): row 16's offset is 2^31, which int32 wraps to -2^31 (the
# interpreter then reads 4 GiB before the buffer: a crash). Every launcher's output must equal the same
# launcher on a contiguous copy, bit for bit (the same kernel on the same values in the same order).
_INT64_SCRIPT = textwrap.dedent(r"""
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import torch
    from fastvar.triton_kernels import attention as A
    lens, H, D, stride = (1, 4, 9, 4), 1, 16, 2 ** 27
    L = sum(lens)
    try:
        store = torch.empty((L - 1) * stride + 5 * H * D, dtype=torch.float16)
    except RuntimeError as e:
        print("SKIP cannot reserve 4 GiB of address space:", e); sys.exit(0)
    rows = store.as_strided((1, L, 5, H, D), (0, stride, H * D, D, 1))       # q k v k_cache v_cache per row
    g = torch.Generator().manual_seed(0)
    rows[:, :, :3].copy_(torch.randn(1, L, 3, H, D, generator=g).half())
    rows[:, :, 3:].fill_(float("nan"))
    q, k, v, kc, vc = rows.unbind(2)
    dense = [t.contiguous() for t in (q, k, v)]
    sm = torch.full((H,), 1.5)
    out, stats = A.block_causal_attention_fwd(q, k, v, lens, 1.0, sm)
    out_c, stats_c = A.block_causal_attention_fwd(*dense, lens, 1.0, sm)
    assert torch.equal(out, out_c) and torch.equal(stats, stats_c), "forward"
    dout = torch.randn(1, L, H, D, generator=g).half()
    grads = A.block_causal_attention_bwd(dout, q, k, v, out, stats, lens, 1.0, sm)
    grads_c = A.block_causal_attention_bwd(dout, *dense, out_c, stats_c, lens, 1.0, sm)
    for name, a, b in zip(("dq", "dk", "dv", "dscale_mul"), grads, grads_c):
        assert torch.equal(a, b), name
    start = sum(lens[:-1])          # the last scale: cache rows 14..17 are written at offsets past 2^31
    kc_c, vc_c = torch.full((1, L, H, D), float("nan"), dtype=torch.float16), torch.full((1, L, H, D), float("nan"), dtype=torch.float16)
    for c, c_c in ((kc, kc_c), (vc, vc_c)):
        c[:, :start].copy_(torch.randn(1, start, H, D, generator=g).half()); c_c[:, :start].copy_(c[:, :start])
    s = slice(start, L)
    step = A.kv_cached_attention_fwd(q[:, s], k[:, s], v[:, s], kc, vc, start, 1.0, sm)
    step_c = A.kv_cached_attention_fwd(dense[0][:, s], dense[1][:, s], dense[2][:, s], kc_c, vc_c, start, 1.0, sm)
    assert torch.equal(step, step_c), "kv step output"
    assert torch.equal(kc, kc_c) and torch.equal(vc, vc_c), "kv step cache append"
    print("OK")
""")


@pytest.mark.interpreter
def test_int64_offsets_sequence_outer_view_interpreter():
    """Forward, backward and the KV step on rows whose ``row * stride`` passes 2^31 elements (a sequence-outer
    view): the same bits as on a contiguous copy (int32 offsets: a crash, or another row's data)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-P", "-c", _INT64_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900)
    if proc.stdout.startswith("SKIP"):
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"exit {proc.returncode} (-11: a segfault, an offset wrapped in int32)\n{proc.stdout[-2000:]}\n"
        f"{proc.stderr[-4000:]}")


@pytest.mark.gpu
def test_gpu_int64_offsets_sequence_outer_view():
    """1024 px (L = 10521), a sequence-outer qkv ``(L, B, 3, H, D)`` with B chosen so that the last rows' offsets
    ``row * B*H*D`` pass 2^31 elements (B = 799 at H = 4, D = 64). Batches 0 and B-1 of the forward, the
    backward and the KV step (the caches sequence-outer too) equal the same kernels run on that batch alone
    (contiguous: small offsets), bit for bit."""
    lens, H, D = lens_of(VAR_1024), 4, 64
    L = sum(lens)
    B = -(-2 ** 31 // ((L - 1) * H * D)) + 1
    elems = L * B * H * D
    need = 12 * elems * 2 + (2 << 30)                          # qkv, out, dout, 3 grads, 2 caches (bf16), slack
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    kern = op_attention._kernels()
    torch.manual_seed(0)
    qkv = torch.empty(L, B, 3, H, D, dtype=torch.bfloat16, device="cuda").normal_()
    q, k, v = qkv.permute(1, 0, 2, 3, 4).unbind(2)             # (B, L, H, D), stride_l = B*H*D
    assert (L - 1) * q.stride(1) >= 2 ** 31
    sm = torch.full((H,), 1.5, device="cuda")
    out, stats = kern.block_causal_attention_fwd(q, k, v, lens, 1.0, sm)
    dout = torch.randn_like(out)
    grads = kern.block_causal_attention_bwd(dout, q, k, v, out, stats, lens, 1.0, sm)
    start = L - lens[-1]
    caches = torch.empty(L, B, 2, H, D, dtype=torch.bfloat16, device="cuda").normal_()
    kc, vc = caches.permute(1, 0, 2, 3, 4).unbind(2)
    before = {b: (kc[b:b + 1].clone(), vc[b:b + 1].clone()) for b in (0, B - 1)}
    step = kern.kv_cached_attention_fwd(q[:, start:], k[:, start:], v[:, start:], kc, vc, start, 1.0, sm)
    for b in (0, B - 1):
        qb, kb, vb = (t[b:b + 1].contiguous() for t in (q, k, v))
        out_b, stats_b = kern.block_causal_attention_fwd(qb, kb, vb, lens, 1.0, sm)
        assert torch.equal(out[b:b + 1], out_b), f"forward, batch {b}"
        grads_b = kern.block_causal_attention_bwd(dout[b:b + 1].contiguous(), qb, kb, vb, out_b, stats_b, lens, 1.0, sm)
        for name, a, a_b in zip(("dq", "dk", "dv"), grads[:3], grads_b[:3]):
            assert torch.equal(a[b:b + 1], a_b), f"{name}, batch {b}"
        kcb, vcb = before[b]
        step_b = kern.kv_cached_attention_fwd(qb[:, start:], kb[:, start:], vb[:, start:], kcb, vcb, start, 1.0, sm)
        assert torch.equal(step[b:b + 1], step_b), f"kv step, batch {b}"
        assert torch.equal(kc[b:b + 1], kcb) and torch.equal(vc[b:b + 1], vcb), f"kv cache append, batch {b}"


# ------------------------------------------------------------------ fp16 overflow in the L2-norm backward
def _tiny_vector_case(which, dtype, device, lens, B, H, D, gen):
    """q, k, v ``(B, L, H, D)`` with the q (or k) of every token past the first 3 scaled to ``|x| ~ 4e-4``
    (q) or ``4e-5`` (k), heads at VAR's clamp (c = 100), and a large ``dout``: the backward's ``dz * c / |q|``
    (dK) and ``dz / |k|`` (dQ) then pass fp16's 65504 while dK (dQ) themselves stay near 1e3."""
    L = sum(lens)
    qkv = torch.randn(B, L, 3, H, D, generator=gen, device=device)
    qkv[:, 3:, {"q": 0, "k": 1}[which]] *= {"q": 1e-4, "k": 1e-5}[which]
    qkv = qkv.to(dtype)
    sm = torch.full((1, H, 1, 1), math.log(100.0), device=device)
    dout = (16 * torch.randn(B, L, H, D, generator=gen, device=device)).to(dtype)
    return qkv, sm, dout


def _reference_grads(qkv, sm, dout, lens):
    q64, k64, v64 = (t.detach().double().requires_grad_(True) for t in qkv.unbind(2))
    out = ref.block_causal_attention(q64, k64, v64, lens, 1.0, sm.double())
    out.backward(dout.double())
    return out.detach(), q64.grad, k64.grad, v64.grad


@pytest.mark.interpreter
@pytest.mark.parametrize("which", ["q", "k"])
def test_fp16_l2norm_backward_tiny_vectors_interpreter(which):
    """fp16 with the fused L2 norm and tiny |q| (|k|): dK (dQ) and dV finite and within fp16's tolerance of
    float64 (cast to fp16, ``dz * row_scale`` and ``dz / |k|`` overflowed to inf)."""
    from fastvar.triton_kernels import attention as A
    lens, B, H, D = (1, 4, 9, 16), 1, 2, 16
    qkv, sm, dout = _tiny_vector_case(which, torch.float16, "cpu", lens, B, H, D, torch.Generator().manual_seed(1))
    q, k, v = qkv.unbind(2)
    out, stats = A.block_causal_attention_fwd(q, k, v, lens, 1.0, sm)
    dq, dk, dv, _ = A.block_causal_attention_bwd(dout, q, k, v, out, stats, lens, 1.0, sm)
    out64, dq64, dk64, dv64 = _reference_grads(qkv, sm, dout, lens)
    other = (dk, dk64) if which == "q" else (dq, dq64)      # the gradient of the tiny vector itself is ~ 1/|x|
    for name, a, r in (("out", out, out64), (f"d{'k' if which == 'q' else 'q'}", *other), ("dv", dv, dv64)):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        err = rel_err(a, r)
        assert err <= REL[torch.float16], f"{name}: relative error {err:.3g} > {REL[torch.float16]:.3g}"


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["q", "k"])
def test_gpu_fp16_l2norm_backward_tiny_vectors(which):
    """As the interpreter test, at d16's size (L = 680, H = 16, D = 64) on the GPU: the other gradient and dV
    within 2x eager's fp16 error (eager normalises first, so its products stay in range)."""
    lens, B, H, D = lens_of(VAR_256), 2, 16, 64
    qkv, sm, dout = _tiny_vector_case(which, torch.float16, "cuda", lens, B, H, D,
                                      torch.Generator(device="cuda").manual_seed(1))
    results = {}
    for impl in ("triton", "eager"):
        leaf = qkv.detach().clone().requires_grad_(True)
        out = op_attention.BLOCK_CAUSAL_IMPLS[impl](*leaf.unbind(2), lens, 1.0, sm)
        out.backward(dout)
        results[impl] = (out.detach(), leaf.grad)
    out64, dq64, dk64, dv64 = _reference_grads(qkv, sm, dout, lens)
    other = "dk" if which == "q" else "dq"       # the gradient of the tiny vector itself is ~ 1/|x|
    for name, r in (("out", out64), (other, dk64 if other == "dk" else dq64), ("dv", dv64)):
        if name == "out":
            got, eager = results["triton"][0], results["eager"][0]
        else:
            j = "qkv".index(name[1])
            got, eager = results["triton"][1][:, :, j], results["eager"][1][:, :, j]
        assert_like_eager(got, eager, r, f"tiny |{which}| {name}")


# ------------------------------------------------------------------ deterministic, capture-safe tiles
_BITS_SCRIPT = textwrap.dedent(r"""
    import hashlib, sys, torch
    from fastvar.ops import attention as op_attention
    lens = tuple(int(x) for x in sys.argv[1].split(","))
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(2, sum(lens), 3, 8, 64, generator=g, device="cuda").bfloat16().requires_grad_(True)
    sm = torch.full((1, 8, 1, 1), 1.4, device="cuda", requires_grad=True)
    out = op_attention.BLOCK_CAUSAL_IMPLS["triton"](*qkv.unbind(2), lens, 1.0, sm)
    out.backward(torch.randn(out.shape, generator=g, device="cuda").bfloat16())
    h = hashlib.sha256()
    for t in (out, qkv.grad, sm.grad):
        h.update(t.detach().float().cpu().numpy().tobytes())
    print(h.hexdigest())
""")


@pytest.mark.gpu
def test_gpu_training_capture_and_bits():
    """A schedule never seen before runs its first forward and backward inside CUDA-graph capture (a run-time
    autotune benchmarks there and fails), the replay gives the uncaptured bits, and two processes give the
    same gradient bits (an autotuner's timing-noise pick of tiles would not)."""
    run = op_attention.BLOCK_CAUSAL_IMPLS["triton"]
    H, D = 8, 64
    warm = (1, 4, 9)                      # compiles the kernels (L does not specialise: no compile for a new L)
    qkv = torch.randn(2, sum(warm), 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    sm = torch.full((1, H, 1, 1), 1.4, device="cuda", requires_grad=True)
    # dout contiguous as in the capture: Triton specialises on strides (a stride of 1 is a constant), so the
    # expanded all-zero-stride gradient of ``.sum()`` would leave the backward kernels to be compiled and loaded
    # inside the capture, where CUDA forbids loading a module
    out = run(*qkv.unbind(2), warm, 1.0, sm)
    out.backward(torch.randn_like(out))
    lens = (1, 4, 9, 16, 25, 36, 49)      # first seen inside the capture
    L = sum(lens)
    x = torch.randn(2, L, 3, H, D, device="cuda", dtype=torch.bfloat16)
    dout = torch.randn(2, L, H, D, device="cuda", dtype=torch.bfloat16)
    static = x.clone().requires_grad_(True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            out = run(*static.unbind(2), lens, 1.0, sm.detach())
            grad, = torch.autograd.grad(out, static, dout)
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()
    torch.cuda.synchronize()
    eager_leaf = x.clone().requires_grad_(True)
    want = run(*eager_leaf.unbind(2), lens, 1.0, sm.detach())
    want_grad, = torch.autograd.grad(want, eager_leaf, dout)
    assert torch.equal(out, want) and torch.equal(grad, want_grad)
    digests = set()
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-P", "-c", _BITS_SCRIPT, ",".join(map(str, lens))],
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        digests.add(proc.stdout.strip().splitlines()[-1])
    assert len(digests) == 1, f"two processes, different gradient bits: {digests}"
    assert hashlib.sha256(b"").hexdigest() not in digests
