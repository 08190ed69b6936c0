"""Sparse token-embedding gradients (``sparse_embedding_grad``): no dense temporary per backward, same gradients.

The equivalence through a Lightning step (plain and GradCache) is in test_gradcache.py; under DDP in
test_distributed.py.
"""

from __future__ import annotations

import copy
import pickle
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    SingleDeviceXLAStrategy,
    XLAStrategy,
)
from PIL import Image
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from vdr.data.collator import EmbeddingCollator
from vdr.lit.biencoder import BackboneConfig, BiEncoderModule
from vdr.models.biencoder import BiEncoder
from vdr.models.sparse_embedding import SparseGradEmbedding, sparse_embedding_gradients

from .conftest import TINY_PIXELS


class NewTensorsShaped(TorchDispatchMode):
    """Counts the dense tensors of one shape that ops make (not those they write in place or return as views)."""

    def __init__(self, shape: torch.Size) -> None:
        super().__init__()
        self.shape, self.made = shape, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.layout == torch.strided and t.shape == self.shape
                    and t.untyped_storage().data_ptr() not in inputs):
                self.made.append(func.__name__)
        return out


def test_replays_make_no_dense_temporary_of_the_token_table(tiny_backbone) -> None:
    """Three backward passes into one ``.grad``, as GradCache's replays run them.

    Without sparse gradients every backward builds a dense gradient of the whole table (151,936 rows: 18.5 MiB for the
    tiny model, 593 MiB of bf16 for the 2B one); from the second on it sits beside ``.grad`` until added in. With them,
    the only dense table-sized tensor made is ``.grad`` itself, in the first backward; the gradient is the same.
    """
    pages = [Image.new("RGB", (64, 64), (40 * i, 90, 200 - 30 * i)) for i in range(3)]
    inputs = EmbeddingCollator(tiny_backbone.processor).encode_pages(pages, "Represent the page.",
                                                                     ["revenue 2015", None, "a caption"])
    model = BiEncoder(tiny_backbone.model).train()
    embedding = model.trunk.get_input_embeddings()

    def replays(sparse: bool) -> tuple[list[str], torch.Tensor]:
        sparse_embedding_gradients(embedding, sparse)
        model.zero_grad(set_to_none=True)
        with NewTensorsShaped(embedding.weight.shape) as probe:
            for weight in (1.0, -0.5, 2.0):
                (model(inputs).sum() * weight).backward()
        return probe.made, embedding.weight.grad.clone()

    made, expected = replays(sparse=False)
    assert made == ["embedding_dense_backward.default"] * 3  # the probe sees the temporaries
    made, grad = replays(sparse=True)
    assert made == ["_to_dense.default"]  # the first backward's sparse gradient becoming `.grad`
    assert grad.layout == torch.strided
    torch.testing.assert_close(grad, expected, atol=1e-6, rtol=1e-5)


def test_switching_keeps_the_weights_and_refuses_a_frozen_table(tiny_backbone) -> None:
    embedding = tiny_backbone.model.get_input_embeddings()
    names = tiny_backbone.model.state_dict().keys()
    sparse_embedding_gradients(embedding, True)
    assert isinstance(embedding, SparseGradEmbedding) and not embedding.sparse  # DDP reads `sparse`: dense buckets
    assert tiny_backbone.model.state_dict().keys() == names
    embedding(torch.tensor([[1, 2]]))
    embedding(torch.tensor([[3]]))  # registers the hook once, not per lookup
    assert len(embedding.weight._post_accumulate_grad_hooks) == 1
    weight = embedding.weight.detach().clone().requires_grad_()
    out = torch.func.functional_call(embedding, {"weight": weight * 2}, (torch.tensor([[1, 1]]),))  # a non-leaf weight
    out.sum().backward()
    assert weight.grad[1].sum() == 2 * 2 * weight.shape[1]  # two lookups of row 1, times 2: no hook needed
    sparse_embedding_gradients(embedding, False)
    assert type(embedding) is nn.Embedding and not embedding.weight._post_accumulate_grad_hooks
    embedding.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="token embeddings are frozen"):
        sparse_embedding_gradients(embedding, True)


@pytest.mark.parametrize("copy_by", ["deepcopy", "pickle", "new weight"])
def test_copies_and_replaced_weights_still_get_a_dense_grad(copy_by: str) -> None:
    """A tensor's hooks do not survive a deep copy or a pickle, and a new weight has none: the lookup adds the hook."""
    torch.manual_seed(0)
    plain = nn.Embedding(50, 8)
    embedding = copy.deepcopy(plain)
    sparse_embedding_gradients(embedding, True)
    embedding(torch.tensor([[3]])).sum().backward()  # in use: its weight has the hook (and a dense .grad)
    assert embedding.weight._post_accumulate_grad_hooks and embedding.weight.grad.layout == torch.strided
    embedding.weight.grad = None
    if copy_by == "deepcopy":
        embedding = copy.deepcopy(embedding)
    elif copy_by == "pickle":
        embedding = pickle.loads(pickle.dumps(embedding))
    else:
        embedding.weight = nn.Parameter(plain.weight.detach().clone())
    assert isinstance(embedding, SparseGradEmbedding) and embedding.weight._post_accumulate_grad_hooks is None
    for table in (plain, embedding):
        for tokens in ([[1, 2, 2]], [[7, 1]], [[49]]):
            (table(torch.tensor(tokens)) ** 2).sum().backward()
    assert embedding.weight.grad.layout == torch.strided  # AdamW refuses a sparse gradient
    torch.testing.assert_close(embedding.weight.grad, plain.weight.grad)


def test_the_module_refuses_it_with_frozen_embeddings_lora_and_fsdp() -> None:
    from vdr.distributed.fsdp import shard_module

    backbone = BackboneConfig("tiny", TINY_PIXELS, TINY_PIXELS)
    with pytest.raises(ValueError, match="token embeddings are frozen"):
        BiEncoderModule(backbone, freeze_token_embeddings=True, sparse_embedding_grad=True)
    with pytest.raises(ValueError, match="token embeddings are frozen"):
        BiEncoderModule(backbone, lora={"r": 4}, sparse_embedding_grad=True)
    module = BiEncoderModule(backbone, sparse_embedding_grad=True)
    with pytest.raises(ValueError, match="sparse_embedding_grad is for one device or DDP"):
        shard_module(module, mesh=None)  # refused before the mesh is read
    # Lightning calls `setup` before the strategy wraps the model. DeepSpeed and XLA are not installed: bare instances.
    for strategy in (FSDPStrategy(), ModelParallelStrategy(), DeepSpeedStrategy.__new__(DeepSpeedStrategy),
                     XLAStrategy.__new__(XLAStrategy), SingleDeviceXLAStrategy.__new__(SingleDeviceXLAStrategy)):
        module._trainer = SimpleNamespace(strategy=strategy)
        with pytest.raises(ValueError, match=f"one device or DDP, not {type(strategy).__name__}"):
            module.setup("fit")
        module.setup("validate")  # no backward there
    for strategy in (SingleDeviceStrategy("cpu"), DDPStrategy()):
        module._trainer = SimpleNamespace(strategy=strategy)
        module.setup("fit")
