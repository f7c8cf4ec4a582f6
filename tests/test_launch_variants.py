"""How many Triton kernels a sample compiles, and that nothing recompiles mid-run.

A GPU compiles a kernel for every new specialization of its launch (constexprs, a 1 or a multiple of 16
among the integer arguments, 16-byte alignment, num_warps, num_stages): a size or offset that changes with
the scale, the batch size or the seed would stall sampling on a compile. tests/sm90_compile.py records the
launches of the real code paths on meta tensors with the GPU's choices forced (no GPU, no values); these
tests read that record. It runs in a subprocess: the recorder needs Triton without ``TRITON_INTERPRET``,
which conftest sets for this session.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="the launch recorder needs Triton")

pytestmark = pytest.mark.slow       # records the launches in a subprocess: ~15 s

HERE = os.path.dirname(os.path.abspath(__file__))

# Distinct compiled kernels of one whole sample (bf16, cfg + top-k + top-p), every batch size alike, recorded
# with the GPU's choices. Per scale, only tile shapes and unrolled window loops specialise: the KV step's
# query tile (4 sizes of BLOCK_M over l = 1 .. 256) and the area downsample of the next scale inside the Phi
# step (window size and output tile: one kernel per scale transition, 9, plus the last scale's); the rest
# is one kernel each (2 AdaLN, 1 draw, 2 gathers: upsampled, and the last scale's plain gather). d30 shares its schedule with d16: the same kernels but its width (AdaLN's row)
# and head count (an argument of the attention step).
# Infinity-2B at 1024 px (bf16, guided): 9 kernels (AdaLN with and without the residual, the RoPE append, the KV
# step at 4 query tiles (l = 1 .. 4096), the cross-attention at 3, the bit draw), every batch size alike.
SAMPLE_VARIANTS = {"d16": 19, "d30": 19, "infinity-2b 1024px": 9}


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    path = tmp_path_factory.mktemp("launches") / "launches.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    pattern = r"^sample d(16|30) B=(1|8|64) plain$|^sample infinity-2b 1024px|^fast draw|^train L=680 d16 bfloat16"
    proc = subprocess.run([sys.executable, "-P", os.path.join(HERE, "sm90_compile.py"), "--record-only",
                           "--paths", pattern, "--json", str(path)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, f"recording failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    with open(path) as f:
        launches = json.load(f)["launches"]
    return launches


def _path(model, B):
    return f"sample {model} B={B}" + ("" if model.startswith("infinity") else " plain")


def _keys(launches, path):
    """The launches a path made: (kernel, its specialization) pairs."""
    return {json.dumps([r["kernel"], r["constexprs"], r["ones"], r["divisible_by_16"], r["types"], r["num_warps"],
                        r["num_stages"]], sort_keys=True) for r in launches if path in r["paths"]}


@pytest.mark.parametrize("model", sorted(SAMPLE_VARIANTS))
def test_a_new_batch_size_compiles_nothing_new(record, model):
    """B = 8 and B = 64 (Infinity: B = 8) launch exactly the kernels of B = 1 (same specializations)."""
    first = _keys(record, _path(model, 1))
    assert len(first) == SAMPLE_VARIANTS[model], (
        f"a {model} sample compiles {len(first)} kernels, documented {SAMPLE_VARIANTS[model]}: update "
        "SAMPLE_VARIANTS (and say why) if the change is meant")
    for B in (8,) if model.startswith("infinity") else (8, 64):
        other = _keys(record, _path(model, B))
        assert other == first, (f"{model}: B={B} compiles {len(other - first)} kernels that B=1 did not "
                                f"(and B=1 had {len(first - other)} it does not): {sorted(other ^ first)[:3]}")


def test_a_sample_compiles_each_kernel_once_per_tile(record):
    """Within one sample, a kernel specialises only on its constexprs (tile shapes), never on a size or
    offset argument: no two launches of one kernel and one set of constexprs differ in specialization."""
    for model in sorted(SAMPLE_VARIANTS):
        seen = {}
        for r in record:
            if _path(model, 1) in r["paths"]:
                tile = json.dumps([r["kernel"], r["constexprs"], r["num_warps"], r["num_stages"]], sort_keys=True)
                assert tile not in seen, f"{model}: {r['kernel']} {r['constexprs']} compiles twice: {seen[tile]} " \
                                         f"and {r['ones'], r['divisible_by_16']}"
                seen[tile] = (r["ones"], r["divisible_by_16"])


def test_a_new_seed_or_offset_compiles_nothing_new(record):
    """The fast-mode draw with other seeds and offsets (0, 1, 2^40 + 17; 0, 1, 16) is one kernel."""
    keys = [_keys(record, p) for p in sorted({p for r in record for p in r["paths"] if p.startswith("fast draw")})]
    assert len(keys) == 3 and len(keys[0]) == 1 and all(k == keys[0] for k in keys), keys


def test_training_tiles_are_pinned(record):
    """Training attention launches each kernel once, with the first (pinned) tile of its table: no run-time
    autotuning (it cannot run inside CUDA-graph capture and its timing-noise pick changes gradient bits
    between processes)."""
    from fastvar.triton_kernels import attention as A
    launches = [r for r in record if "train L=680 d16 bfloat16 norm=1" in r["paths"]]
    by_kernel = {}
    for r in launches:
        by_kernel.setdefault(r["kernel"], []).append(r)
    assert set(by_kernel) == {"_block_causal_attn_fwd_kernel", "_block_causal_attn_bwd_preprocess_kernel",
                              "_block_causal_attn_bwd_dkdv_kernel", "_block_causal_attn_bwd_dq_kernel"}
    for kind in ("fwd", "dkdv", "dq"):
        (r,) = by_kernel[f"_block_causal_attn_{'bwd_' if kind != 'fwd' else ''}{kind}_kernel"]
        bm, bn, warps, stages = A._HOPPER_CONFIGS[(kind, "half", 64)][0]
        assert (r["constexprs"]["BLOCK_M"], r["constexprs"]["BLOCK_N"], r["num_warps"], r["num_stages"]) == \
            (bm, bn, warps, stages), (kind, r)


def test_launchers_never_autotune():
    """No launcher wraps a kernel in ``triton.autotune`` or calls ``do_bench`` (source check: the GPU lane's
    test_gpu_training_capture_and_bits runs them)."""
    import pathlib
    root = pathlib.Path(HERE).parent
    for path in sorted((root / "triton_kernels").glob("*.py")) + sorted((root / "fastvar" / "ops").glob("*.py")):
        text = path.read_text()
        for word in ("triton.autotune", "do_bench", "Autotuner"):
            assert word not in text, f"{path.name} uses {word}"
