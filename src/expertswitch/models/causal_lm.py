"""The trainable decoder: the same model as models/decoder.py (same config.json, same tensor
names, same RoPE), as an nn.Module over padded [B, T] batches, for training and evaluation.

Dense layers are Llama's (`model.layers.{i}.mlp.{gate,up,down}_proj`), so a dense model saves
as a Llama checkpoint transformers loads; a layer listed in `moe_layers` has a DeepSpeed-style
MoE FFN (moe/layer.py, stacked SwiGLU experts) whose state dict sits under
`model.layers.{i}.mlp.` and the checkpoint's model_type is `expertswitch_moe` (the serving
Decoder loads both).

    model = CausalLM(ModelConfig.from_dict(hf_config_dict))
    out = model(ids, labels=ids)       # out.loss (LM, HF's shift), out.aux_loss (Σ MoE layers)
    model.save_pretrained("DIR")      # config.json + model.safetensors
    model = CausalLM.from_pretrained("DIR")
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from expertswitch.errors import CheckpointError, ConfigError
from expertswitch.models.config import ModelConfig, MoELayerSpec
from expertswitch.models.rope import Rotary
from expertswitch.moe.layer import MoE

_ACT = {"silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}  # fmt: skip
INIT_STD = 0.02  # Llama's initializer_range


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm: normalised in fp32, cast back, then scaled."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int | None):
        super().__init__()
        h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.cfg, self.window = cfg, window
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, rope: Rotary, cos, sin) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q = rope.apply(self.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim), cos, sin)
        k = rope.apply(self.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim), cos, sin)
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim)
        q, k, v = (u.transpose(1, 2) for u in (q, k, v))  # [B, heads, T, D]
        groups = cfg.num_heads // cfg.num_kv_heads
        if groups > 1:
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
        if self.window is None or self.window >= t:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a token sees itself and window − 1 tokens before it
            i = torch.arange(t, device=x.device)
            mask = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < self.window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hs, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(hs, f, bias=bias)
        self.up_proj = nn.Linear(hs, f, bias=bias)
        self.down_proj = nn.Linear(f, hs, bias=bias)
        self.act = _ACT[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def build_moe(cfg: ModelConfig, spec: MoELayerSpec, ep_size: int = 1) -> MoE:
    """The MoE FFN of one layer (this rank's experts when ep_size > 1)."""
    return MoE.stacked(
        cfg.hidden_size, cfg.intermediate_size, spec.num_experts, k=spec.k,
        activation="swiglu", bias=cfg.mlp_bias, use_residual=spec.use_residual, ep_size=ep_size,
        capacity_factor=spec.capacity_factor, eval_capacity_factor=spec.eval_capacity_factor,
        min_capacity=spec.min_capacity, drop_tokens=spec.drop_tokens,
        noisy_gate_policy=spec.noisy_gate_policy, use_rts=spec.use_rts,
    )  # fmt: skip


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int, ep_size: int = 1):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, cfg.sliding_windows[i])
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        spec = cfg.moe_layers[i] if cfg.moe_layers else None
        self.mlp = build_moe(cfg, spec, ep_size) if spec else MLP(cfg)

    def forward(self, x, rope, cos, sin) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, cos, sin)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            out, aux, _ = self.mlp(h)
            return x + out, aux
        return x + self.mlp(h), None


class Backbone(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig, ep_size: int = 1):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i, ep_size) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LMOutput:
    logits: torch.Tensor  # [B, T, V] fp32
    loss: torch.Tensor | None  # mean next-token cross entropy over labelled positions
    aux_loss: torch.Tensor  # Σ over MoE layers of their load-balancing loss (0 when dense)


_TRAINED = ("llama", "mistral", "qwen2", "expertswitch_moe")  # the layouts built below


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, hf_config: dict | None = None, ep_size: int = 1):
        super().__init__()
        if cfg.model_type not in _TRAINED:  # (Phi-3, Qwen3, Gemma, Mixtral-style MoE blocks:
            # the blocks below would build a different model)
            raise ConfigError(f"{cfg.model_type} checkpoints are served, not trained here: "
                              "`expertswitch train` builds Llama-shaped models (and "
                              "expertswitch_moe)")  # fmt: skip
        self.cfg = cfg
        self.hf_config = dict(hf_config) if hf_config else None
        self.rope = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.model = Backbone(cfg, ep_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.reset_parameters()
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @classmethod
    def from_config(cls, hf_config: dict, ep_size: int = 1) -> CausalLM:
        return cls(ModelConfig.from_dict(hf_config), hf_config, ep_size)

    def reset_parameters(self) -> None:
        """Llama's initialisation for every matrix, experts and gates included (so a dense and an
        MoE model start alike); norms at 1, biases at 0."""
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("bias", ".b_in", ".b_out")):  # experts' biases are [E, F]
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=INIT_STD)
            else:
                nn.init.zeros_(p)

    def moe_layers(self) -> list[MoE]:
        return [b.mlp for b in self.model.layers if isinstance(b.mlp, MoE)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> LMOutput:
        """input_ids [B, T]; labels [B, T] (−100: no target), shifted as transformers does:
        position t's logits predict labels[t + 1]."""
        t = input_ids.shape[1]
        if t > self.cfg.max_position_embeddings:
            raise ValueError(f"a sequence of {t} tokens exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")  # fmt: skip
        pos = torch.arange(t, device=input_ids.device)
        cos, sin = self.rope.cos_sin(pos)
        x = self.model.embed_tokens(input_ids)
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.model.layers:
            x, a = block(x, self.rope, cos, sin)
            if a is not None:
                aux = aux + a.float()
        logits = self.lm_head(self.model.norm(x)).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                   ignore_index=-100)  # fmt: skip
        return LMOutput(logits, loss, aux)

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (k of each MoE layer's experts)."""
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        for moe in self.moe_layers():
            per_expert = sum(p[0].numel() for p in moe.experts.parameters())
            total -= per_expert * (moe.num_local_experts - moe.gate.k)
        return total

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors named as in the checkpoint (a tied lm_head is not stored twice)."""
        state = {k: v.detach() for k, v in self.state_dict().items()}
        if self.cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """config.json + model.safetensors into `path` (made if missing, as transformers does)."""
        from safetensors.torch import save_file

        if self.hf_config is None:
            raise ValueError("this model was built without its config.json dict: build it with "
                             "CausalLM.from_config")  # fmt: skip
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous().cpu()
                 for k, v in self.hf_state_dict().items()}  # fmt: skip
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        cfg = dict(self.hf_config)
        cfg["torch_dtype"] = str(dtype or torch.float32).removeprefix("torch.")
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, path: str | Path, ep_size: int = 1) -> CausalLM:
        """A checkpoint that `save_pretrained` (or transformers, for Llama) wrote; fp32."""
        from expertswitch.io.checkpoint import open_checkpoint

        ckpt = open_checkpoint(path)
        model = cls.from_config(ckpt.config, ep_size)
        state = model.state_dict()
        expected = set(model.hf_state_dict())
        have = set(ckpt.names())
        missing, unknown = sorted(expected - have), sorted(have - expected - {"lm_head.weight"})
        if missing or unknown:
            raise CheckpointError(f"{path} does not match its config.json: missing "
                                  f"{missing[:5]}, unexpected {unknown[:5]}; was it written "
                                  "for another model?")  # fmt: skip
        with torch.no_grad():
            for name in expected:
                t = ckpt.get(name)
                if tuple(t.shape) != tuple(state[name].shape):
                    raise CheckpointError(f"{path}: {name} has shape {tuple(t.shape)}, the "
                                          f"config gives {tuple(state[name].shape)}")  # fmt: skip
                state[name].copy_(t.to(torch.float32))
        return model
