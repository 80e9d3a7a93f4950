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


def test_fingerprint_is_stable_and_independent_of_sharding(llama_pair, tmp_path):
    from safetensors.torch import load_file

    base_dir, _ = llama_pair
    fp = open_checkpoint(base_dir).fingerprint()
    assert fp == open_checkpoint(base_dir).fingerprint()
    state = load_file(str(base_dir / "model.safetensors"))
    names = sorted(state)
    resharded = tmp_path / "sharded"
    _write_shards(resharded, base_dir, [{n: state[n] for n in names[:7]},
                                        {n: state[n] for n in names[7:]}])  # fmt: skip
    assert open_checkpoint(resharded).fingerprint() == fp  # same weights, other files


def _write_shards(out, like, shards) -> None:
    import json
    import shutil

    from safetensors.torch import save_file

    out.mkdir()
    shutil.copyfile(like / "config.json", out / "config.json")
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in shard.items()}, str(out / name))
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("change", ["middle_rows", "norms_only", "embedding_rows"])
def test_fingerprint_catches_a_base_that_differs_in_few_places(llama_pair, tmp_path, change):
    """What the old row-sampling fingerprint let through: a base differing only in rows it did
    not sample (not 0, N/2 or N−1), only in its norms (3 of their elements were hashed), or in a
    few re-initialised embedding rows."""
    from safetensors.torch import load_file, save_file

    base_dir, _ = llama_pair
    state = load_file(str(base_dir / "model.safetensors"))
    if change == "middle_rows":
        w = state["model.layers.0.self_attn.q_proj.weight"]
        w[5] += 1e-3  # row 5 of 64: not a row the old scheme read
        w[40] -= 1e-3
    elif change == "norms_only":
        for n in state:
            if n.endswith("norm.weight"):
                state[n][7] *= 1.01  # element 7: not the first, middle or last
    else:
        state["model.embed_tokens.weight"][[11, 12, 200]] = torch.randn(3, 64)
    other = tmp_path / "other"
    other.mkdir()
    save_file(state, str(other / "model.safetensors"))
    (other / "config.json").write_bytes((base_dir / "config.json").read_bytes())
    assert open_checkpoint(other).fingerprint() != open_checkpoint(base_dir).fingerprint()


def test_fingerprint_cache_follows_the_files(llama_pair, tmp_path, monkeypatch):
    """The cached fingerprint is reused only while the weight files are unchanged."""
    from safetensors.torch import load_file, save_file

    import expertswitch.io.checkpoint as ckpt

    monkeypatch.setenv("EXPERTSWITCH_CACHE", str(tmp_path / "cache"))
    base_dir, _ = llama_pair
    copy = tmp_path / "copy"
    copy.mkdir()
    state = load_file(str(base_dir / "model.safetensors"))
    save_file(state, str(copy / "model.safetensors"))
    (copy / "config.json").write_bytes((base_dir / "config.json").read_bytes())
    first = open_checkpoint(copy).fingerprint()
    ckpt._FINGERPRINTS.clear()  # a new process: only the on-disk cache
    assert open_checkpoint(copy).fingerprint() == first
    assert list((tmp_path / "cache" / "fingerprints").iterdir())
    state["model.norm.weight"][3] += 1.0
    save_file(state, str(copy / "model.safetensors"))
    assert open_checkpoint(copy).fingerprint() != first


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
    # the same shapes, positions rotated otherwise (a 4k fine-tune against a 128k base)
    import json
    import shutil

    shutil.copytree(base_dir, tmp_path / "rope")
    cfg_file = tmp_path / "rope" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    rope = cfg.get("rope_parameters") or {"rope_type": "default"}
    cfg["rope_parameters"] = {**rope, "rope_theta": 500000.0}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(CompatibilityError, match="rope_parameters is .* but"):
        check_compatible(open_checkpoint(base_dir), open_checkpoint(tmp_path / "rope"))
    # served otherwise from the same shapes: the activation changed
    shutil.copytree(base_dir, tmp_path / "act")
    act = {**json.loads((base_dir / "config.json").read_text()), "hidden_act": "gelu"}
    (tmp_path / "act" / "config.json").write_text(json.dumps(act))
    with pytest.raises(CompatibilityError, match="hidden_act is 'silu' .* but 'gelu'"):
        check_compatible(open_checkpoint(base_dir), open_checkpoint(tmp_path / "act"))


def test_soft_caps_must_agree(tmp_path):
    """Gemma 2: a cap turned off (null) or changed in the fine-tune is refused; one left out
    is transformers' default, the base's here."""
    import json

    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                          vocab_size=64)  # fmt: skip
    Gemma2ForCausalLM(config).save_pretrained(tmp_path / "base")
    base_cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    for i, change in enumerate(({"attn_logit_softcapping": None},
                                {"final_logit_softcapping": 10.0})):  # fmt: skip
        Gemma2ForCausalLM(config).save_pretrained(tmp_path / f"e{i}")
        (tmp_path / f"e{i}" / "config.json").write_text(json.dumps({**base_cfg, **change}))
        with pytest.raises(CompatibilityError, match="softcap.* is .* but"):
            check_compatible(open_checkpoint(tmp_path / "base"),
                             open_checkpoint(tmp_path / f"e{i}"))  # fmt: skip
    dropped = {k: v for k, v in base_cfg.items() if k != "attn_logit_softcapping"}
    (tmp_path / "e0" / "config.json").write_text(json.dumps(dropped))  # left out: the default
    check_compatible(open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "e0"))


def test_gemma3_layer_kinds_and_local_rope_must_agree(tmp_path):
    """Gemma 3: a fine-tune whose layers are windowed otherwise, or whose windowed or global
    layers rotate by another base frequency (written the 4.x way, which the raw keys do not
    compare), is refused; the same settings in 4.x keys, or another context length, are
    accepted."""
    import json

    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              vocab_size=64, layer_types=["sliding_attention",
                                                          "full_attention"])  # fmt: skip
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "base")
    Gemma3ForCausalLM(config).save_pretrained(tmp_path / "e")
    base_cfg = json.loads((tmp_path / "base" / "config.json").read_text())
    v4 = {k: v for k, v in base_cfg.items() if k not in ("rope_parameters", "layer_types")}
    v4.update(rope_theta=1e6, rope_local_base_freq=1e4, sliding_window_pattern=2)
    swapped = {**base_cfg, "layer_types": ["full_attention", "sliding_attention"]}
    changes = [(swapped, "local_layers is"),
               ({**v4, "rope_local_base_freq": 500.0}, "local_rope is"),
               ({**v4, "rope_theta": 5e5}, "rope is"),  # (the global one, the 4.x way)
               ({**base_cfg, "max_position_embeddings": 4096}, None),  # a shorter context
               (v4, None)]  # fmt: skip
    for expert_cfg, match in changes:
        (tmp_path / "e" / "config.json").write_text(json.dumps(expert_cfg))
        pair = open_checkpoint(tmp_path / "base"), open_checkpoint(tmp_path / "e")
        if match is None:
            check_compatible(*pair)
            continue
        with pytest.raises(CompatibilityError, match=f"{match} .* but"):
            check_compatible(*pair)


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
