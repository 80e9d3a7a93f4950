"""One decoder for the Llama, Mistral, Qwen2 and Mixtral families, built from a Hugging Face
`config.json` and loaded tensor by tensor with io/checkpoint (no transformers at run time).

GQA, RoPE (models/rope.py), per-layer sliding windows, tied or untied embeddings, q/k/v (and o)
biases, Mixtral's sparse MoE FFN (moe/mixtral.py). Every linear layer is a MultiExpertLinear,
every norm and the embedding take each row's expert into account, so one forward pass serves a
batch that mixes experts and base-only rows.

    model = Decoder.load("BASE_DIR", device="cpu", dtype=torch.float32)
    hidden = model.forward(ids, ctx, kv)          # ids [T], ctx: StepContext, kv: [(k, v)] / layer
    logits = model.logits(hidden[last_rows], eb)  # [B, V]
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from expertswitch.errors import CheckpointError, ConfigError
from expertswitch.io.checkpoint import Checkpoint, open_checkpoint
from expertswitch.models.attention import PaddedLayout, paged_attention, write_kv
from expertswitch.models.config import ModelConfig
from expertswitch.models.context import ExpertBatch, StepContext
from expertswitch.models.layers import MultiExpertLinear, RowEmbedding, RowNorm
from expertswitch.models.rope import Rotary

_ACT = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}  # fmt: skip


class _Loader:
    def __init__(self, ckpt: Checkpoint, device, dtype):
        self.ckpt, self.device, self.dtype = ckpt, device, dtype

    def get(self, name: str, optional: bool = False) -> torch.Tensor | None:
        if name not in self.ckpt:
            if optional:
                return None
            raise CheckpointError(f"{self.ckpt.path} lacks tensor {name}; is it a complete "
                                  "Llama/Mistral/Qwen2/Mixtral checkpoint?")  # fmt: skip
        return self.ckpt.get(name).to(self.device, self.dtype)

    def norm(self, name: str, eps: float) -> RowNorm:
        return RowNorm(name, self.get(name), eps)

    def linear(self, name: str, bias: bool = False, fill: float = 0.0) -> MultiExpertLinear:
        w = self.get(name + ".weight")
        b = self.get(name + ".bias", optional=not bias)
        return MultiExpertLinear(name + ".weight", w, b, fill)


class DecoderLayer:
    def __init__(self, i: int, cfg: ModelConfig, ld: _Loader, rope: Rotary, ep_size: int = 1):
        p = f"model.layers.{i}."
        self.cfg, self.rope = cfg, rope
        self.window = cfg.sliding_windows[i]
        self.input_norm = ld.norm(p + "input_layernorm.weight", cfg.rms_norm_eps)
        self.post_norm = ld.norm(p + "post_attention_layernorm.weight", cfg.rms_norm_eps)
        a = p + "self_attn."
        self.q = ld.linear(a + "q_proj", cfg.qkv_bias)
        self.k = ld.linear(a + "k_proj", cfg.qkv_bias)
        self.v = ld.linear(a + "v_proj", cfg.qkv_bias)
        self.o = ld.linear(a + "o_proj", cfg.o_bias)
        self.moe = None
        spec = cfg.moe_layers[i] if cfg.moe_layers else None
        if cfg.num_experts:
            if ep_size > 1:
                raise ConfigError("expert parallelism serves expertswitch_moe checkpoints; "
                                  "Mixtral's MoE block runs whole: leave "
                                  "expert_parallel_size at 1")  # fmt: skip
            self.moe = _load_mixtral_moe(p, cfg, ld)
        elif spec is not None:
            self.moe = _load_trained_moe(p, cfg, spec, ld, ep_size)
        else:
            self.gate = ld.linear(p + "mlp.gate_proj", cfg.mlp_bias)
            self.up = ld.linear(p + "mlp.up_proj", cfg.mlp_bias)
            self.down = ld.linear(p + "mlp.down_proj", cfg.mlp_bias)
        self.act = _ACT[cfg.hidden_act]
        self.scale = 1.0 / math.sqrt(cfg.head_dim)

    def attention(self, x, ctx: StepContext, kv, layout, cos, sin) -> torch.Tensor:
        cfg, eb = self.cfg, ctx.experts
        t = x.shape[0]
        q = self.q(x, eb).view(t, cfg.num_heads, cfg.head_dim)
        k = self.k(x, eb).view(t, cfg.num_kv_heads, cfg.head_dim)
        v = self.v(x, eb).view(t, cfg.num_kv_heads, cfg.head_dim)
        q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        write_kv(kv[0], kv[1], k, v, ctx.attention.slot_mapping)
        out = paged_attention(q, kv[0], kv[1], layout, self.window, self.scale)
        return self.o(out, eb)

    def mlp(self, x, eb: ExpertBatch) -> torch.Tensor:
        if self.moe is not None:
            return self.moe(x)
        return self.down(self.act(self.gate(x, eb)) * self.up(x, eb), eb)

    def __call__(self, x, ctx, kv, layout, cos, sin) -> torch.Tensor:
        eb = ctx.experts
        x = x + self.attention(self.input_norm(x, eb), ctx, kv, layout, cos, sin)
        return x + self.mlp(self.post_norm(x, eb), eb)


def _load_mixtral_moe(prefix: str, cfg: ModelConfig, ld: _Loader):
    from expertswitch.moe.mixtral import MixtralSparseMoE

    names = ld.ckpt.names()
    for block in ("block_sparse_moe.", "mlp."):
        if any(n.startswith(prefix + block) for n in names):
            break
    else:
        raise CheckpointError(f"{ld.ckpt.path}: no MoE tensors under {prefix}")
    moe = MixtralSparseMoE(cfg.hidden_size, cfg.intermediate_size, cfg.num_experts,
                           cfg.experts_per_token, ld.dtype, ld.device).eval()  # fmt: skip
    state = {n[len(prefix + block) :]: ld.get(n) for n in names if n.startswith(prefix + block)}
    moe.load_hf_state_dict(state)
    moe.requires_grad_(False)
    return moe


def _load_trained_moe(prefix: str, cfg: ModelConfig, spec, ld: _Loader, ep_size: int = 1):
    """An `expertswitch train` MoE FFN (models/causal_lm.py), served dropless: a request's
    tokens never lose their expert to other requests of the batch (capacity is a training
    device), so the output equals the trained layer's in eval with drop_tokens=False. With
    ep_size > 1 (under torchrun) this rank loads only its E / ep_size experts."""
    from dataclasses import replace

    from expertswitch.models.causal_lm import build_moe

    moe = build_moe(cfg, replace(spec, drop_tokens=False), ep_size)
    moe = moe.to(ld.device, ld.dtype).eval()
    first, local = moe.first_local_expert, moe.num_local_experts
    want = moe.state_dict()
    state = {}
    for name, t in want.items():
        full = prefix + "mlp." + name
        if name.startswith("experts."):  # [E, ...]: this rank's slice, cut before the copy
            if full not in ld.ckpt:
                ld.get(full)  # raises the loader's error
            whole = ld.ckpt.get(full)
            if whole.shape[0] != spec.num_experts:
                raise CheckpointError(f"{ld.ckpt.path}: {full} holds {whole.shape[0]} experts, "
                                      f"its config.json gives {spec.num_experts}")  # fmt: skip
            state[name] = whole[first : first + local].to(ld.device, ld.dtype)
        else:
            state[name] = ld.get(full)
        if state[name].shape != t.shape:
            raise CheckpointError(f"{ld.ckpt.path}: {prefix}mlp.{name} has shape "
                                  f"{tuple(state[name].shape)}, its config.json gives "
                                  f"{tuple(t.shape)}")  # fmt: skip
    moe.load_state_dict(state)
    moe.requires_grad_(False)
    return lambda x: moe.infer(x)


class Decoder:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, device, dtype, ep_size: int = 1):
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        if ep_size > 1 and not cfg.num_experts and not any(cfg.moe_layers or []):
            raise ConfigError("expert parallelism spreads the experts of an expertswitch_moe "
                              "checkpoint's MoE layers, and this one has none: leave "
                              "expert_parallel_size at 1")  # fmt: skip
        ld = _Loader(ckpt, device, dtype)
        self.rope = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.embed = RowEmbedding("model.embed_tokens.weight", ld.get("model.embed_tokens.weight"))
        self.layers = [DecoderLayer(i, cfg, ld, self.rope, ep_size)
                       for i in range(cfg.num_layers)]  # fmt: skip
        self.norm = ld.norm("model.norm.weight", cfg.rms_norm_eps)
        if cfg.tie_word_embeddings or "lm_head.weight" not in ckpt:
            # tied: an expert's changed embedding is its lm_head too (same tensor name)
            self.lm_head = MultiExpertLinear("model.embed_tokens.weight", self.embed.weight,
                                             fill=float("-inf"))  # fmt: skip
        else:
            self.lm_head = ld.linear("lm_head", fill=float("-inf"))
        self.shapes = {n: ckpt.shape(n) for n in ckpt.names()}

    def servable_names(self) -> set[str]:
        """Tensor names an expert may change: every one a layer applies per row."""
        names = {self.embed.name, self.norm.name, self.lm_head.name}
        for layer in self.layers:
            names |= {layer.input_norm.name, layer.post_norm.name}
            linears = [layer.q, layer.k, layer.v, layer.o]
            if layer.moe is None:
                linears += [layer.gate, layer.up, layer.down]
            for lin in linears:
                names |= {lin.name, lin.bias_name}
        return names

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32,
             ep_size: int = 1) -> Decoder:  # fmt: skip
        ckpt = open_checkpoint(path)
        return cls(ModelConfig.from_dict(ckpt.config), ckpt, device, dtype, ep_size)

    @classmethod
    def from_tensors(cls, config: dict, tensors: dict[str, torch.Tensor], device="cpu",
                     dtype=torch.float32) -> Decoder:  # fmt: skip
        """From in-memory tensors named as in an HF checkpoint (benchmarks, synthetic models)."""
        return cls(ModelConfig.from_dict(config), TensorDict(tensors), device, dtype)

    def new_kv_cache(self, num_blocks: int, block_size: int, dtype=None):
        """One (keys, values) pair per layer, each [num_blocks, block_size, kv_heads, D]."""
        cfg = self.cfg
        shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
        dt = dtype or self.dtype
        return [(torch.zeros(shape, dtype=dt, device=self.device),
                 torch.zeros(shape, dtype=dt, device=self.device))
                for _ in range(cfg.num_layers)]  # fmt: skip

    def kv_bytes_per_token(self, dtype=None) -> int:
        el = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.cfg.num_layers * self.cfg.kv_dim * el

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, ctx: StepContext, kv_cache) -> torch.Tensor:
        """ids [T] (rows of all sequences, in order) → final hidden states [T, H]."""
        ab = ctx.attention
        layout = PaddedLayout.build(ab)
        cos, sin = self.rope.cos_sin(ab.positions, ab.seq_lens)
        x = self.embed(ids, ctx.experts)
        for layer, kv in zip(self.layers, kv_cache):
            x = layer(x, ctx, kv, layout, cos, sin)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        """hidden [B, H] (one row per sequence) → fp32 logits [B, V] (V: the widest active
        vocabulary; columns past a row's own vocabulary are −inf)."""
        return self.lm_head(self.norm(hidden, eb), eb).float()


class TensorDict:
    """The part of io/checkpoint.Checkpoint the decoder reads, over a dict of tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors, self.path = tensors, Path("<memory>")

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.tensors[name].shape)
