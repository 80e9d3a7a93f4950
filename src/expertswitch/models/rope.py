"""Rotary position embeddings with the `rope_scaling` kinds Llama/Mistral/Qwen2/Phi-3 configs
use: default, linear, dynamic (NTK), llama3, yarn, longrope. Same formulas as transformers' rope
utilities, so a checkpoint's positions mean the same thing here.

    rope = Rotary(config)
    q, k = rope.apply(q, k, positions, seq_lens)   # q [T, h, D], k [T, kv, D], positions [T]

`dynamic` depends on the sequence's current length (transformers recomputes the frequencies when
a forward pass reaches past max_position_embeddings), and so does `longrope` (Phi-3: the short
factors while the sequence is within original_max_position_embeddings, the long ones past it);
`seq_lens` [T] gives, per token, the length its sequence has in this pass (max position + 1).
"""

from __future__ import annotations

import math

import torch

from expertswitch.errors import ConfigError

KINDS = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
LENGTH_DEPENDENT = ("dynamic", "longrope")  # a key's rotation depends on its sequence's length


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(p: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    base, factor = p["rope_theta"], p.get("factor")
    original = p["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all \
            else mscale(factor)  # fmt: skip
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra = 1 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    return inv, attention


def _longrope(p: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(short, long) inverse frequencies and the attention factor, as transformers computes
    them: base^(2i/d) times each channel's factor; √(1 + ln s / ln original), s the context's
    growth (`factor`, else max_position_embeddings / original)."""
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    pair = []
    for key in ("short_factor", "long_factor"):
        ext = torch.tensor(p[key], dtype=torch.float32)
        if ext.shape != shape.shape:
            raise ConfigError(f"rope_scaling {key} has {ext.numel()} entries; the rotary "
                              f"dimension {dim} needs {shape.numel()}")  # fmt: skip
        pair.append(1.0 / (ext * p["rope_theta"] ** shape))
    return pair[0], pair[1], float(attention)


class Rotary:
    def __init__(self, rope: dict, head_dim: int, max_position_embeddings: int):
        self.params = p = dict(rope)
        self.kind = p.get("rope_type", "default")
        if self.kind not in KINDS:
            raise ConfigError(f"rope_type {self.kind!r} is not supported ({', '.join(KINDS)})")
        self.dim = int(head_dim * p.get("partial_rotary_factor", 1.0))
        self.max_pos = max_position_embeddings
        self.attention_scaling = 1.0
        theta = p["rope_theta"]
        try:
            if self.kind in ("default", "dynamic"):
                inv = _base_inv_freq(theta, self.dim)
            elif self.kind == "linear":
                inv = _base_inv_freq(theta, self.dim) / p["factor"]
            elif self.kind == "llama3":
                inv = _llama3(_base_inv_freq(theta, self.dim), p)
            elif self.kind == "longrope":
                inv, self.inv_long, self.attention_scaling = _longrope(
                    p, self.dim, max_position_embeddings
                )
                self.original = p["original_max_position_embeddings"]
            else:
                inv, self.attention_scaling = _yarn(p, self.dim, max_position_embeddings)
        except KeyError as e:
            raise ConfigError(f"rope_scaling of type {self.kind} lacks {e.args[0]!r}") from None
        self.inv_freq = inv  # fp32 [D/2]
        self._on: dict[tuple, torch.Tensor] = {}  # (device, which) → inverse frequencies

    def _inv(self, device: torch.device, inv: torch.Tensor | None = None) -> torch.Tensor:
        """inv_freq (or `inv`, LongRoPE's long one) on `device`, copied there once."""
        inv = self.inv_freq if inv is None else inv
        key = (device, id(inv))
        if key not in self._on:
            self._on[key] = inv.to(device)
        return self._on[key]

    def _dynamic_inv(self, seq_lens: torch.Tensor) -> torch.Tensor:
        """[T, D/2]: transformers' NTK base for the sequence's length, once past max_pos."""
        theta, factor = self.params["rope_theta"], self.params["factor"]
        dim = self.dim
        n = seq_lens.to(torch.float32).clamp_min(self.max_pos)
        base = theta * ((factor * n / self.max_pos) - (factor - 1)) ** (dim / (dim - 2))
        exps = torch.arange(0, dim, 2, dtype=torch.int64, device=n.device).float() / dim
        return 1.0 / (base.unsqueeze(-1) ** exps)

    def cos_sin(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None):
        """cos, sin fp32 [T, D] for integer positions [T]."""
        pos = positions.to(torch.float32)
        if self.kind == "longrope" and seq_lens is not None:
            long = (seq_lens > self.original).unsqueeze(-1)  # [T, 1]: per token's sequence
            inv = torch.where(long, self._inv(pos.device, self.inv_long), self._inv(pos.device))
            freqs = pos.unsqueeze(-1) * inv
        elif (
            self.kind == "dynamic"
            and seq_lens is not None
            and bool((seq_lens > self.max_pos).any())
        ):
            freqs = pos.unsqueeze(-1) * self._dynamic_inv(seq_lens)
        else:
            freqs = pos.unsqueeze(-1) * self._inv(positions.device).unsqueeze(0)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, h, D]: rotate the first `dim` channels (all of them unless partial)."""
        d = self.dim
        c, s = cos.unsqueeze(1), sin.unsqueeze(1)
        if c.dtype != x.dtype:  # (each torch op, a no-op conversion's too, costs at decode)
            c, s = c.to(x.dtype), s.to(x.dtype)
        rot = x if d == x.shape[-1] else x[..., :d]
        half = d // 2
        rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
        out = rot * c + rotated * s  # (transformers' rounding: no fused multiply-add)
        return out if d == x.shape[-1] else torch.cat([out, x[..., d:]], dim=-1)
