"""Loading the official Infinity golden outputs in ../shared/golden_infinity (format in its README), with the
loader of ``golden`` (``$FASTVAR_GOLDEN_INFINITY`` may point elsewhere)."""
from golden import GoldenSet


def _build_infinity(g):
    from fastvar.models import infinity_from_state_dicts
    return infinity_from_state_dicts(g["infinity_state_dict"], g["vae_state_dict"])


INFINITY_GOLDEN = GoldenSet("FASTVAR_GOLDEN_INFINITY", "golden_infinity",
                            ("infinity_d2_sq16.pt", "infinity_d4_r0.5_patchify.pt"), "Infinity", _build_infinity)
FILES = INFINITY_GOLDEN.files
golden_dir, load, models = INFINITY_GOLDEN.golden_dir, INFINITY_GOLDEN.load, INFINITY_GOLDEN.models


def text_tuple(g):
    t = g["inputs"]["text"]
    return t["kv_compact"], t["lens"], t["cu_seqlens_k"], t["max_seqlen_k"]
