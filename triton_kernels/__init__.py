"""fastvar's Triton kernels, installed as ``fastvar.triton_kernels``.

One file per op: ``@triton.jit`` kernels (``_<op>_fwd_kernel``, ``_<op>_bwd_kernel``) and a plain
launcher. No autograd and no modules here: ``fastvar/ops`` wraps these.
"""
