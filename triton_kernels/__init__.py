"""fastvar's Triton kernels, installed as ``fastvar.triton_kernels`` (setup.py maps this folder there).

One file per op: ``@triton.jit`` kernels (``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``) and a plain
launcher. No autograd and no modules here: ``fastvar/ops`` wraps these.

Import it as ``fastvar.triton_kernels`` only. Triton ships its own top-level ``triton_kernels``;
fastvar installs nothing under that name (run the tests with ``pytest``, not ``python -m pytest``
from the repository root, which would put this folder on ``sys.path`` as ``triton_kernels``).
"""
