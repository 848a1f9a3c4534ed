import pytest
import torch

from prune_plugin import PruningOptimizer, PruningPolicy, StateError, finalize
from prune_plugin.compress import (compress_folder, compress_state_dict, decompress_folder,
                                   decompress_state_dict, load_compressed, pack_bits, unpack_bits)

from .models import bert_batch, tiny_bert


def sparse_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(64, 48, generator=g)
    w[torch.rand(64, 48, generator=g) > 0.1] = 0
    return {"sparse.weight": w, "dense.bias": torch.randn(48, generator=g),
            "emb": torch.randn(30, 8, generator=g), "ids": torch.arange(5),
            "half": torch.randn(4, 4, generator=g).bfloat16()}


def test_bit_packing_round_trips_and_matches_numpy():
    import numpy as np
    mask = torch.rand(123) > 0.5
    packed = pack_bits(mask)
    assert torch.equal(torch.from_numpy(np.packbits(mask.numpy())), packed)
    assert torch.equal(unpack_bits(packed, 123), mask)


@pytest.mark.parametrize("codec", ["none", "lzma", "zstd"])
def test_fp32_round_trip_is_exact_and_smaller(codec):
    state = sparse_state()
    blobs, manifest = compress_state_dict(state, codec=codec)
    assert manifest["params"]["sparse.weight"]["encoding"] == "bitmask"
    assert manifest["params"]["emb"]["encoding"] == "dense"
    back = decompress_state_dict(blobs, manifest)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    stored = manifest["params"]["sparse.weight"]["bytes"]
    assert stored < state["sparse.weight"].numel() * 4 / 4


def test_int8_keeps_the_sparsity_pattern_and_is_close():
    state = sparse_state()
    blobs, manifest = compress_state_dict(state, quantize="int8", codec="none")
    back = decompress_state_dict(blobs, manifest)
    w, q = state["sparse.weight"], back["sparse.weight"]
    assert not ((q != 0) & (w == 0)).any()  # pruned weights stay pruned
    assert (q != 0).sum() >= 0.95 * (w != 0).sum()  # only tiny kept weights round to 0
    row_max = w.abs().amax(1, keepdim=True)
    assert ((q - w).abs() <= row_max / 254 + 1e-7).all()
    assert torch.equal(back["emb"], state["emb"])  # dense tensors untouched


def test_finalized_model_folder_round_trips_through_from_pretrained(tmp_path):
    from transformers import BertForSequenceClassification

    model = tiny_bert()
    policy = PruningPolicy(method="magnitude", initial_remaining=0.1, final_remaining=0.1,
                           total_steps=1)
    PruningOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), policy, model=model)
    finalize(model).eval()
    model.save_pretrained(tmp_path / "model")
    manifest = compress_folder(tmp_path / "model", tmp_path / "c", codec="none")
    assert sum(e["encoding"] == "bitmask" for e in manifest["params"].values()) == 12
    assert (tmp_path / "c" / "config.json").is_file()
    decompress_folder(tmp_path / "c", tmp_path / "plain")
    loaded = BertForSequenceClassification.from_pretrained(tmp_path / "plain").eval()
    batch = bert_batch()
    batch.pop("labels")
    assert torch.equal(loaded(**batch).logits, model(**batch).logits)


def test_refuses_what_is_not_a_compressed_checkpoint(tmp_path):
    with pytest.raises(StateError, match="no compressed checkpoint"):
        load_compressed(tmp_path)
    with pytest.raises(StateError, match="holds no model.safetensors"):
        compress_folder(tmp_path, tmp_path / "out", codec="none")
