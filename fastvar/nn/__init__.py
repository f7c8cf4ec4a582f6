"""Drop-in ``torch.nn`` modules with the official VAR names, running on fastvar's ops."""
from .attention import AdaLNBeforeHead, AdaLNSelfAttn, DropPath, FFN, KVCache, SelfAttention, SharedAdaLin
from .quant import Phi, PhiNonShared, PhiPartiallyShared, PhiShared, VectorQuantizer2
