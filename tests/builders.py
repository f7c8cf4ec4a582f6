"""Small random models shared by the tests (CPU, seconds to build)."""
import torch

import fastvar
from fastvar.nn import VectorQuantizer2


def tiny_vae_var(patch_nums=(1, 2, 4), depth=2, V=64, num_classes=10, **kw):
    """A VQVAE (16-px images, 8-channel latent) and a VAR of width 64*depth with random official-init
    weights; extra keyword arguments go to ``fastvar.build_vae_var``."""
    return fastvar.build_vae_var("cpu", depth=depth, ch=32, V=V, Cvae=8, patch_nums=patch_nums,
                                 num_classes=num_classes, vae_kwargs=dict(ch_mult=(1, 2, 2)), **kw)


def random_quantizer(patch_nums, share_quant_resi=4, quant_resi=0.5, C=8, V=64, seed=0):
    """A ``VectorQuantizer2`` with every parameter drawn from N(0, 0.3^2) (no zeros), in eval mode."""
    q = VectorQuantizer2(V, C, v_patch_nums=patch_nums, share_quant_resi=share_quant_resi, quant_resi=quant_resi)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in q.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return q.eval()
