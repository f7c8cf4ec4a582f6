"""The weights a sampling adapter holds: the model's own tensors where they already have the compute dtype, casts
(and derived tensors, e.g. concatenated biases) otherwise, kept in step with the model (:class:`HeldWeights`)."""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

import torch
import torch.nn as nn

from fastvar.nn.attention import copy_unless_same


def tensor_slots(*modules: nn.Module) -> List[Tuple[dict, str]]:
    """Every parameter and buffer of ``modules`` as (its module's ``_parameters`` / ``_buffers``, name): read
    through these, a tensor the model replaces is seen (walking ``parameters()`` again costs ~0.75 ms per
    sample for d30 on a 2-core CPU; these lookups ~0.1 ms)."""
    return [(d, name) for mod in modules for m in mod.modules() for d in (m._parameters, m._buffers)
            for name, t in d.items() if t is not None]


def weights_fingerprint(slots: List[Tuple[dict, str]]) -> tuple:
    """Where each tensor lives and how often it was modified in place (its version counter): it changes
    with an optimizer step, ``load_state_dict``, ``.to()``, a replaced parameter or an in-place edit of the
    tensor. (Inference tensors have no version counter; they cannot change outside inference mode.)"""
    out = []
    for d, name in slots:
        t = d.get(name)
        out.append(None if t is None else (t.data_ptr(), -1 if t.is_inference() else t._version))
    return tuple(out)


class HeldWeights:
    """Weight bookkeeping shared by the adapters. A subclass sets, in its constructor: ``slots``
    (:func:`tensor_slots` of the model and its VAE) and ``fingerprint``; ``_pairs``, (held tensor, model
    tensor) for the embeddings and projections it reads directly; ``blocks`` and their ``block_weights``
    (``step_weights``), ``head_nm`` and its ``head_ada``."""

    def stale(self) -> bool:
        """True once a tensor of the model or its VAE was replaced or moved since this adapter was built (its
        held tensors would point at the old ones): the Sampler then builds a new adapter."""
        now = weights_fingerprint(self.slots)
        return [f and f[0] for f in now] != [f and f[0] for f in self.fingerprint]

    def sync(self, always: bool = True) -> None:
        """Copy the model's current values into the held casts and derived tensors, in place (captured CUDA graphs
        keep reading them). ``always=False`` skips it unless a version counter moved (an in-place edit through
        torch: an optimizer step, ``load_state_dict``, ``p.copy_``), which misses edits through ``.data`` and of
        inference tensors; ``always=True`` sees every edit, for one read of every weight and one write of the
        casts (nothing but ``qkv_b`` when the compute dtype is the weights' own)."""
        now = weights_fingerprint(self.slots)
        if not always and now == self.fingerprint:
            return
        with torch.inference_mode(False), torch.no_grad():
            for held, t in self._pairs:
                copy_unless_same(held, t)
            for b, w in zip(self.blocks, self.block_weights):
                b.sync_step_weights(w)
            self.head_nm.sync_step_weights(self.head_ada)
        self.fingerprint = now

    def weight_bytes(self) -> int:
        """Bytes of the held tensors that are not the model's own (casts, and the concatenated qkv biases)."""
        own = {t.data_ptr() for d, name in self.slots if (t := d.get(name)) is not None}
        held = [h for h, _ in self._pairs] + list(self.head_ada)
        for w in self.block_weights:
            for f in dataclasses.fields(w):
                v = getattr(w, f.name)
                held += [t for t in (v if isinstance(v, tuple) else (v,)) if isinstance(t, torch.Tensor)]
        return sum(t.numel() * t.element_size() for t in {id(t): t for t in held}.values() if t.data_ptr() not in own)
