"""Class labels: one rule for every form (list, tuple, tensor, scalar, numpy): integers only, never truncated."""
import numpy as np
import pytest
import torch

from builders import tiny_vae_var
from fastvar.labels import as_label_tensor, batch_size_of, sampling_labels
from fastvar.pretrained import digit_labels
from fastvar.sampler import Sampler

NUM_CLASSES = 10
INFO = {"class_names": [str(i) for i in range(NUM_CLASSES)], "num_classes": NUM_CLASSES}

# every form a float or a bool can arrive in; each must be refused, whatever its value
NOT_INTEGERS = [
    [10.5], [3.0], (1.0,), [1, 2.5], [True], (False, 1), [np.float32(2)], [np.bool_(True)], [torch.tensor(2.0)],
    [torch.tensor(True)], np.array([1.5]), np.array([True]), np.array([2.0]), torch.tensor([1.0, 2.0]),
    torch.tensor([True]), torch.tensor([1 + 1j]), 3.0, 10.5, True, np.float64(3), torch.tensor(3.0),
    torch.tensor(True), np.array(2.0), [[1]], "7", [None], b"1",
]
# every form an integer can arrive in; all mean class 7 (B = 1)
SEVENS = [7, np.int64(7), np.int32(7), np.uint8(7), torch.tensor(7), torch.tensor(7, dtype=torch.int32), np.array(7),
          [7], (7,), [np.int64(7)], [torch.tensor(7)], np.array([7]), np.array([7], dtype=np.int16),
          torch.tensor([7]), torch.tensor([7], dtype=torch.uint8)]


@pytest.mark.parametrize("labels", NOT_INTEGERS, ids=repr)
def test_non_integer_labels_are_refused_with_the_argument_named(labels):
    with pytest.raises(TypeError, match=r"^my_labels must be .*(class ids|integer)"):
        sampling_labels(batch_size_of(labels), labels, NUM_CLASSES, None, "cpu", name="my_labels")


@pytest.mark.parametrize("labels", SEVENS, ids=repr)
def test_integer_labels_of_every_form_mean_the_same(labels):
    assert sampling_labels(batch_size_of(labels), labels, NUM_CLASSES, None, "cpu").tolist() == [7]


def test_the_offending_element_is_named():
    with pytest.raises(TypeError, match=r"labels must be class ids \(integers\), got 10\.5 \(float\) at labels\[1\]"):
        as_label_tensor([3, 10.5], "labels")
    with pytest.raises(TypeError, match=r"got True \(bool\) at labels\[0\]"):
        as_label_tensor([True], "labels")


@pytest.fixture(scope="module")
def small():
    return tiny_vae_var((1, 2, 4))


@pytest.mark.parametrize("labels", [[10.5], [True], (1.0, 2.0), np.array([1.5]), 3.0, torch.tensor(3.0)], ids=repr)
def test_every_api_refuses_float_and_bool_labels(small, labels):
    """The Sampler, the official API, teacher forcing and the digits helper apply the same rule."""
    vae, var = small
    B = batch_size_of(labels)
    with pytest.raises(TypeError, match=r"^labels must be"):
        Sampler(var, dtype=torch.float32).sample(labels, seed=0, top_k=5)
    with pytest.raises(TypeError, match=r"^label_B must be"):
        var.autoregressive_infer_cfg(B, labels, g_seed=0, top_k=5)
    if isinstance(labels, (list, tuple, np.ndarray)) or (isinstance(labels, torch.Tensor) and labels.dim()):
        with pytest.raises(TypeError, match=r"^label_B must be"):
            var(labels, torch.randn(B, var.L - var.first_l, var.Cvae))
    with pytest.raises(TypeError, match=r"labels must be"):
        digit_labels(labels, INFO)


def test_numpy_and_tuple_labels_sample_like_lists(small):
    vae, var = small
    sampler = Sampler(var, dtype=torch.float32)
    ref, _ = sampler.tokens([3, 7], seed=1, top_k=5)
    for form in ((3, 7), np.array([3, 7]), torch.tensor([3, 7], dtype=torch.int32), [np.int64(3), torch.tensor(7)]):
        got, _ = sampler.tokens(form, seed=1, top_k=5)
        assert all(torch.equal(a, b) for a, b in zip(got, ref)), repr(form)
    assert digit_labels(np.array([3, 7]), INFO) == [3, 7] == digit_labels((np.int8(3), "7"), INFO)


def test_teacher_forcing_takes_label_sequences(small):
    vae, var = small
    var.cond_drop_rate = 0.0
    x = torch.randn(2, var.L - var.first_l, var.Cvae)
    with torch.no_grad():
        ref = var(torch.tensor([3, 7]), x)
        assert torch.equal(var([3, 7], x), ref) and torch.equal(var(np.array([3, 7]), x), ref)


@pytest.mark.parametrize("empty", [[], (), torch.tensor([], dtype=torch.long)], ids=repr)
def test_empty_labels_say_so(small, empty):
    vae, var = small
    with pytest.raises(ValueError, match="labels must name at least one class"):
        Sampler(var).sample(empty)


def test_model_sizes_are_positive_ints():
    import fastvar
    vae, _ = tiny_vae_var((1, 2, 4))
    for kw in (dict(num_classes=0), dict(depth=0), dict(num_classes=2.5), dict(norm_eps=0.0),
               dict(norm_eps=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(kw))):
            fastvar.VAR(vae, embed_dim=64, num_heads=1, patch_nums=(1, 2, 4), **{"depth": 1, **kw})
