"""fastvar.patch recognises the official modules by more than their class name: a user's own class named like
one (FFN, SelfAttention, ...) keeps computing what it computes, and a warning names it."""
import warnings

import pytest
import torch
import torch.nn as nn

import fastvar
import official_arch
from fastvar.nn import attention as fnn
from fastvar.reference import block_causal_bias

C = 64


class FFN(nn.Module):
    """A user's MLP that happens to share the official name, parameter names and shapes: ReLU, not GELU."""

    def __init__(self, C, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(C, hidden), nn.ReLU(), nn.Linear(hidden, C)
        self.drop = nn.Identity()

    def forward(self, x):
        return self.drop(self.fc2(self.act(self.fc1(x))))


class ResidualFFN(official_arch.FFN):
    """The official structure exactly (fc1, GELU tanh, fc2, drop), but a residual added: only its output tells."""

    def forward(self, x):
        return x + super().forward(x)


ResidualFFN.__name__ = ResidualFFN.__qualname__ = "FFN"


class SelfAttention(official_arch.SelfAttention):
    """The official attention plus a learned temperature: one parameter more."""

    def __init__(self, *args):
        super().__init__(*args)
        self.temperature = nn.Parameter(torch.ones(1))


class AdaLNBeforeHead(nn.Module):
    """Named like the official head norm, but another call: forward(x) with the condition set beforehand."""

    def __init__(self, C):
        super().__init__()
        self.C = self.D = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=1e-6, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x):
        return self.ln_wo_grad(x)


def _block(seed=0):
    torch.manual_seed(seed)
    blk = official_arch.AdaLNSelfAttn(0, C, 1, shared_aln=False, attn_l2_norm=True)
    for p in blk.parameters():          # away from the zero init, so every tensor matters
        nn.init.normal_(p, std=0.1)
    return blk.eval()


def _run_block(blk):
    g = torch.Generator().manual_seed(1)
    x, cond = torch.randn(2, 5, C, generator=g), torch.randn(2, C, generator=g)
    with torch.no_grad():
        return blk(x, cond, attn_bias=block_causal_bias([1, 4], "cpu")[None, None])


@pytest.mark.parametrize("make,reason", [
    (lambda: FFN(C, 4 * C), r"its act is ReLU\(\), not GELU\(approximate='tanh'\)"),
    (lambda: ResidualFFN(C, 4 * C), r"it computes something else than the official FFN"),
])
def test_a_users_ffn_is_left_alone_with_a_warning(make, reason):
    blk = _block()
    blk.ffn = make()
    nn.init.normal_(blk.ffn.fc1.weight, std=0.1)
    before = _run_block(blk)
    model = nn.ModuleDict({"block": blk})
    with pytest.warns(UserWarning, match=r"fastvar.patch left block\.ffn \(test_patch_recognition\.\w*FFN\) as it is: "
                                         r"it is named like the official FFN, but " + reason):
        fastvar.patch(model)
    assert type(blk.ffn).__module__ == __name__, "the user's FFN was replaced"
    assert isinstance(blk.attn, fnn.SelfAttention), "the official attention beside it is still patched"
    assert torch.allclose(_run_block(model["block"]), before, atol=1e-6), "patch changed what the model computes"


def test_a_block_around_an_unrecognised_module_stays_the_users_too():
    blk = _block()
    blk.ffn = FFN(C, 4 * C)
    model = nn.ModuleList([blk])
    with pytest.warns(UserWarning) as record:
        fastvar.patch(model)
    messages = [str(w.message) for w in record]
    assert any("left 0 (official_arch.AdaLNSelfAttn)" in m and "its ffn was not recognised" in m for m in messages)
    assert model[0] is blk


def test_extra_parameters_or_another_signature_are_not_official():
    blk = _block()
    blk.attn = SelfAttention(0, C, 1, True)
    head = AdaLNBeforeHead(C)
    model = nn.ModuleDict({"block": blk, "head": head})
    with pytest.warns(UserWarning) as record:
        fastvar.patch(model)
    text = "\n".join(str(w.message) for w in record)
    assert "left block.attn" in text and "extra temperature" in text
    assert "left head" in text and "forward(x) does not take the official 2 arguments" in text
    assert model["head"] is head and type(blk.attn) is SelfAttention


def test_official_modules_patch_without_a_warning():
    blk = _block()
    before = _run_block(blk)
    model = nn.ModuleList([blk])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastvar.patch(model)
    assert isinstance(model[0], fnn.AdaLNSelfAttn) and isinstance(model[0].ffn, fnn.FFN)
    assert torch.allclose(_run_block(model[0]), before, atol=1e-5)


def test_meta_device_models_are_recognised_by_structure():
    """Tensors on the meta device hold no values: the output check is skipped, the structure still decides."""
    with torch.device("meta"):
        ok = nn.ModuleList([official_arch.AdaLNSelfAttn(0, C, 1, shared_aln=True, attn_l2_norm=False)])
        mine = nn.ModuleDict({"ffn": FFN(C, 4 * C)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastvar.patch(ok)
    assert isinstance(ok[0], fnn.AdaLNSelfAttn)
    with pytest.warns(UserWarning, match="left ffn"), pytest.raises(ValueError, match="nothing was patched"):
        fastvar.patch(mine)
