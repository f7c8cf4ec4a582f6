"""Training scripts for the small models bundled with fastvar.

``python -m fastvar.train.digits --out runs/digits`` trains the VQVAE + VAR pair behind
``fastvar.pretrained.load_digits`` on scikit-learn's 8x8 handwritten digits (needs scikit-learn:
``pip install fastvar[train]``). See ``fastvar/weights/README.md`` for the exact command and runtime.
"""
