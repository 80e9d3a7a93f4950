import json

import pytest
import torch
from conftest import save_pair, tiny_config
from transformers import LlamaForCausalLM

from expertswitch.errors import CheckpointError, CompatibilityError
from expertswitch.io.checkpoint import check_compatible, open_checkpoint


def test_reads_single_file_tensor_by_tensor(llama_pair):
    base_dir, _ = llama_pair
    ck = open_checkpoint(base_dir)
    model = LlamaForCausalLM.from_pretrained(base_dir)
    state = model.state_dict()
    assert set(ck.names()) == set(state)
    for name in ck.names():
        assert ck.shape(name) == tuple(state[name].shape)
        assert torch.equal(ck.get(name), state[name])
    assert ck.numel() == sum(t.numel() for t in state.values())


def test_reads_sharded_checkpoint(tmp_path):
    base_dir, _ = save_pair(tmp_path, max_shard_size="100KB")
    assert (base_dir / "model.safetensors.index.json").is_file()
    ck = open_checkpoint(base_dir)
    state = LlamaForCausalLM.from_pretrained(base_dir).state_dict()
    assert set(ck.names()) == set(state)
    assert all(torch.equal(ck.get(n), state[n]) for n in ck.names())


def test_fingerprint_is_stable_and_tells_models_apart(llama_pair):
    base_dir, expert_dir = llama_pair
    assert open_checkpoint(base_dir).fingerprint() == open_checkpoint(base_dir).fingerprint()
    assert open_checkpoint(base_dir).fingerprint() != open_checkpoint(expert_dir).fingerprint()


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")


def test_missing_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no config.json"):
        open_checkpoint(tmp_path)


def test_missing_shard(tmp_path):
    base_dir, _ = save_pair(tmp_path, max_shard_size="100KB")
    index = json.loads((base_dir / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (base_dir / victim).unlink()
    with pytest.raises(CheckpointError, match=f"missing shard.*{victim}"):
        open_checkpoint(base_dir)


def test_pickle_checkpoint_is_refused_with_the_fix(tmp_path):
    model = LlamaForCausalLM(tiny_config())
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle.*safe_serialization=True"):
        open_checkpoint(tmp_path)


def test_truncated_safetensors(tmp_path):
    base_dir, _ = save_pair(tmp_path)
    f = base_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(base_dir).get("model.norm.weight")


def test_mismatched_architectures(tmp_path, llama_pair):
    base_dir, _ = llama_pair
    cfg = tiny_config()
    cfg.hidden_size = 96
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "other")
    with pytest.raises(CompatibilityError, match="hidden_size is 64 .* but 96"):
        check_compatible(open_checkpoint(base_dir), open_checkpoint(tmp_path / "other"))


def test_mismatched_shapes(tmp_path, llama_pair):
    """Same config keys, but a tensor of another shape (a hand-edited or broken checkpoint)."""
    base_dir, _ = llama_pair
    model = LlamaForCausalLM.from_pretrained(base_dir)
    state = model.state_dict()
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(8, 64)
    from safetensors.torch import save_file

    (tmp_path / "bad").mkdir()
    model.config.save_pretrained(tmp_path / "bad")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "bad/model.safetensors")
    with pytest.raises(CompatibilityError, match="up_proj.weight has shape \\[8, 64\\]"):
        check_compatible(open_checkpoint(base_dir), open_checkpoint(tmp_path / "bad"))
