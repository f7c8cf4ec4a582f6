"""VAR and its VQVAE with the official names, composed of fastvar's modules."""
from .build import build_vae_var, load_vae_var, vae_var_from_state_dicts
from .var import VAR
from .vqvae import AttnBlock, Decoder, Encoder, ResnetBlock, VQVAE
from .bsq_vae import BSQVAE
from .build_infinity import infinity_from_state_dicts, load_infinity
from .infinity import Infinity
