"""One decoder for the Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma (1, 2 and 3's text model) and
Mixtral families (and Qwen2-MoE, Qwen3-MoE), built from a Hugging Face `config.json` and loaded
tensor by tensor with io/checkpoint (no transformers at run time).

GQA, RoPE (models/rope.py; Gemma 3: one for the sliding-window layers, one for the others),
per-layer sliding windows, tied or untied embeddings, q/k/v (and o) biases, Qwen3's and
Gemma 3's per-head q/k RMSNorms, Gemma's (1 + w) norms, scaled embeddings, sandwich norms and
soft caps, Mixtral's, Qwen2-MoE's and Qwen3-MoE's sparse MoE FFN
(moe/mixtral.py; Qwen2-MoE's shared expert beside it). Every linear layer is a
MultiExpertLinear, every norm and the embedding take each row's expert into account, so one
forward pass serves a batch that mixes experts and base-only rows.

    model = Decoder.load("BASE_DIR", device="cpu", dtype=torch.float32)
    hidden = model.forward(ids, ctx, kv)          # ids [T], ctx: StepContext, kv: [(k, v)] / layer
    logits = model.logits(hidden[last_rows], eb)  # [B, V]

Under torchrun the decoder can be split over ranks that all run the same batch (the engine's
lockstep): `ep_size` spreads an expertswitch_moe checkpoint's experts (each rank routes 1/ep of
the tokens and the outputs are all-gathered), `tp_size` slices the attention and dense MLP
layers Megatron-style over consecutive ranks (q/k/v and gate/up by output rows — whole heads —,
o and down by input columns, one all-reduce each). Embedding, norms and lm_head stay whole.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from expertswitch.errors import CheckpointError, ConfigError
from expertswitch.io.checkpoint import (
    Checkpoint,
    TextView,
    open_checkpoint,
    text_name,
    text_view,
)
from expertswitch.models.attention import PaddedLayout, paged_attention, write_kv
from expertswitch.models.config import ModelConfig
from expertswitch.models.context import ExpertBatch, StepContext
from expertswitch.models.layers import (
    FusedLinears,
    MultiExpertLinear,
    RowEmbedding,
    RowNorm,
    stacked_rows,
)
from expertswitch.models.moe_rows import RowMixtralMoE
from expertswitch.models.rope import LENGTH_DEPENDENT, Rotary

_ACT = {
    "silu": F.silu, "swish": F.silu, "relu": F.relu, "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}  # fmt: skip


log = logging.getLogger(__name__)

# families whose activations outgrow float16 (their checkpoints are bf16): transformers and
# vLLM warn alike
_FP16_OVERFLOWS = ("gemma2", "gemma3_text")


def _split(n: int, tp_size: int, what: str) -> int:
    if n % tp_size:
        raise ConfigError(f"{what}={n} does not split over tensor_parallel_size {tp_size}: "
                          "choose a size that divides it")  # fmt: skip
    return n // tp_size


class TensorSlices:
    """This rank's part of a tensor-parallel group: which slice of each sliced weight it holds,
    and the all-reduce that sums the row-parallel layers' partial outputs."""

    def __init__(self, tp_size: int):
        import torch.distributed as dist

        from expertswitch.parallel.tensor import tensor_parallel_group

        if not (dist.is_available() and dist.is_initialized()):
            raise ConfigError("tensor_parallel_size > 1 needs torch.distributed: launch with "
                              "torchrun (the CLI sets the process group up)")  # fmt: skip
        self.size = tp_size
        self.group = tensor_parallel_group(tp_size)
        self.rank = dist.get_rank(self.group)

    def span(self, n: int, part: tuple[int, int] | None = None) -> tuple[int, int]:
        """[lo, hi) of this rank's slice of n: part (index, parts) of n, by default (this
        rank, the group size); a kv head replicated over ranks is part (its head, kv heads)."""
        index, parts = part or (self.rank, self.size)
        return index * n // parts, (index + 1) * n // parts

    def rows(self, t: torch.Tensor, part: tuple[int, int] | None = None) -> torch.Tensor:
        """This rank's slice of dim 0 (a copy: the whole tensor is freed)."""
        lo, hi = self.span(t.shape[0], part)
        return t[lo:hi].clone()

    def cols(self, t: torch.Tensor, part: tuple[int, int] | None = None) -> torch.Tensor:
        lo, hi = self.span(t.shape[1], part)
        return t[:, lo:hi].contiguous()

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        from expertswitch.parallel.comm import collective

        collective("tensor-parallel all-reduce", None, dist.all_reduce, y, group=self.group)
        return y


class RowParallelLinear:
    """A MultiExpertLinear over this rank's input columns, summed over the tensor-parallel
    group, then the whole bias (added once)."""

    def __init__(self, inner: MultiExpertLinear, bias: torch.Tensor | None, tp: TensorSlices):
        self.inner, self.bias, self.tp = inner, bias, tp
        self.name, self.bias_name = inner.name, inner.bias_name

    def __call__(self, x: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        y = self.tp.reduce(self.inner(x, eb).contiguous())
        if self.bias is None:
            return y
        rows = stacked_rows(eb, self.bias_name, self.bias)  # an expert's own bias, if any
        return y + (self.bias if rows is None else rows)


class _Loader:
    def __init__(self, ckpt: Checkpoint, device, dtype, tp: TensorSlices | None = None):
        self.ckpt, self.device, self.dtype, self.tp = ckpt, device, dtype, tp
        # tensor parallelism: tensor name → ("rows" | "cols", this rank's part or None)
        self.sliced: dict[str, tuple[str, tuple[int, int] | None]] = {}

    def get(self, name: str, optional: bool = False) -> torch.Tensor | None:
        if name not in self.ckpt:
            if optional:
                return None
            raise CheckpointError(f"{self.ckpt.path} lacks tensor {name}; is it a complete "
                                  f"{getattr(self.ckpt, 'config', {}).get('model_type')} "
                                  "checkpoint?")  # fmt: skip
        return self.ckpt.get(name).to(self.device, self.dtype)

    def expect(self, name: str, want: tuple[int, ...], what: str) -> None:
        """A clear error when a stored tensor has not the shape config.json gives it (a
        damaged or mismatched config.json would fail deep inside a matmul, or worse, run).
        A missing tensor is left to `get`, which names it."""
        if name not in self.ckpt:
            return
        got = tuple(self.ckpt.shape(name))
        if got != tuple(want):
            raise CheckpointError(f"{self.ckpt.path}: {name} is {list(got)}, but config.json "
                                  f"makes it {list(want)} ({what}): config.json does not "
                                  "describe these weights; use the config.json saved with "
                                  "them")  # fmt: skip

    def norm(self, name: str, cfg: ModelConfig) -> RowNorm:
        return RowNorm(name, self.get(name), cfg.rms_norm_eps, cfg.norm_offset)

    def linear(self, name: str, bias: bool = False, fill: float = 0.0, split: str | None = None,
               part: tuple[int, int] | None = None):  # fmt: skip
        """split (under tensor parallelism): "col" keeps this rank's output rows (and bias
        slice; `part` names another slice than the rank's own), "row" its input columns (a
        RowParallelLinear)."""
        w = self.get(name + ".weight")
        b = self.get(name + ".bias", optional=not bias)
        if self.tp is None or split is None:
            return MultiExpertLinear(name + ".weight", w, b, fill)
        if split == "col":
            self.sliced.update({name + ".weight": ("rows", part), name + ".bias": ("rows", part)})
            b = None if b is None else self.tp.rows(b, part)
            return MultiExpertLinear(name + ".weight", self.tp.rows(w, part), b, fill)
        self.sliced[name + ".weight"] = ("cols", None)  # (its bias is added after the all-reduce)
        return RowParallelLinear(MultiExpertLinear(name + ".weight", self.tp.cols(w)), b, self.tp)


class DecoderLayer:
    def __init__(self, i: int, cfg: ModelConfig, ld: _Loader, rope: Rotary, ep_size: int = 1):
        p = f"model.layers.{i}."
        self.cfg, self.rope = cfg, rope
        # with two RoPEs (Gemma 3) cos/sin are stacked [2, T, D]: this layer's is [1] (local)
        # or [0]; None: one RoPE, cos/sin [T, D]
        self.rope_slot = None if cfg.local_rope is None else int(cfg.local_layers[i])
        tp = ld.tp.size if ld.tp else 1
        self.heads, self.kv_heads = cfg.num_heads // tp, max(cfg.num_kv_heads // tp, 1)
        # more ranks than kv heads: each kv head is replicated over tp / kv ranks, whose query
        # heads are exactly those that read it
        kv_part = None
        if tp > cfg.num_kv_heads:
            kv_part = (ld.tp.rank // (tp // cfg.num_kv_heads), cfg.num_kv_heads)
        self.window = cfg.sliding_windows[i]
        self.input_norm = ld.norm(p + "input_layernorm.weight", cfg)
        self.post_norm = ld.norm(p + "post_attention_layernorm.weight", cfg)
        self.pre_ff_norm = self.post_ff_norm = None  # Gemma 2's sandwich: post_norm then
        if cfg.sandwich_norms:  # norms the attention's output, these the MLP's input/output
            self.pre_ff_norm = ld.norm(p + "pre_feedforward_layernorm.weight", cfg)
            self.post_ff_norm = ld.norm(p + "post_feedforward_layernorm.weight", cfg)
        a = p + "self_attn."
        _expect_layer(ld, cfg, p, i)
        self.qkv = self.gate_up = None  # Phi-3's fused projections (one linear each)
        # q, k, v (gate, up) as one product on CPU where the step allows (layers.FusedLinears)
        self.fused_qkv = self.fused_gate_up = None
        if cfg.fused_proj:  # (never sliced: Decoder refuses tensor parallelism for them)
            self.qkv = ld.linear(a + "qkv_proj", cfg.qkv_bias)
        else:
            self.q = ld.linear(a + "q_proj", cfg.qkv_bias, split="col")
            self.k = ld.linear(a + "k_proj", cfg.qkv_bias, split="col", part=kv_part)
            self.v = ld.linear(a + "v_proj", cfg.qkv_bias, split="col", part=kv_part)
            self.fused_qkv = FusedLinears.of([self.q, self.k, self.v])
        self.o = ld.linear(a + "o_proj", cfg.o_bias, split="row")
        self.q_norm = self.k_norm = None  # Qwen3's, over each head (whole on every rank)
        if cfg.qk_norm:
            self.q_norm = ld.norm(a + "q_norm.weight", cfg)
            self.k_norm = ld.norm(a + "k_norm.weight", cfg)
        self.moe = None
        self.shared: list | None = None  # Qwen2-MoE's shared expert: gate, up, down, its gate
        spec = cfg.moe_layers[i] if cfg.moe_layers else None
        if cfg.num_experts and cfg.sparse_layers[i]:
            if ep_size > 1:
                raise ConfigError("expert parallelism serves expertswitch_moe checkpoints; "
                                  f"{cfg.model_type}'s MoE blocks run whole: leave "
                                  "expert_parallel_size at 1")  # fmt: skip
            self.moe = _load_mixtral_moe(p, cfg, ld)  # RowMixtralMoE: experts may change it
            if cfg.shared_expert_intermediate_size:  # Qwen2-MoE: a dense SwiGLU beside the
                s = p + "mlp.shared_expert."  # routed experts, scaled by sigmoid(x·gᵀ)
                self.shared = [ld.linear(s + "gate_proj"), ld.linear(s + "up_proj"),
                               ld.linear(s + "down_proj"),
                               ld.linear(p + "mlp.shared_expert_gate")]  # fmt: skip
        elif spec is not None:
            self.moe = _load_trained_moe(p, cfg, spec, ld, ep_size)
        else:
            if cfg.fused_proj:
                self.gate_up = ld.linear(p + "mlp.gate_up_proj", cfg.mlp_bias)
            else:
                self.gate = ld.linear(p + "mlp.gate_proj", cfg.mlp_bias, split="col")
                self.up = ld.linear(p + "mlp.up_proj", cfg.mlp_bias, split="col")
                self.fused_gate_up = FusedLinears.of([self.gate, self.up])
            self.down = ld.linear(p + "mlp.down_proj", cfg.mlp_bias, split="row")
        self.act = _ACT[cfg.hidden_act]
        self.scale = cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)

    def attention(self, x, ctx: StepContext, kv, layout, cos, sin) -> torch.Tensor:
        cfg, eb = self.cfg, ctx.experts
        t, d = x.shape[0], cfg.head_dim
        if self.rope_slot is not None:
            cos, sin = cos[self.rope_slot], sin[self.rope_slot]
        qkv = None if self.fused_qkv is None else self.fused_qkv(x, eb)
        if qkv is None and self.qkv is not None:  # Phi-3: q, k and v rows of one projection
            qkv = self.qkv(x, eb)
        if qkv is not None:  # q, k and v as column views of one product
            nq, nk = self.heads * d, self.kv_heads * d
            v = qkv[:, nq + nk :].view(t, self.kv_heads, d)
            if self.q_norm is None:  # q and k side by side: rotated in one pass
                qk = self.rope.apply(qkv[:, : nq + nk].view(t, -1, d), cos, sin)
                q, k = qk[:, : self.heads], qk[:, self.heads :]
            else:
                q = self.q_norm(qkv[:, :nq].view(t, self.heads, d), eb)
                k = self.k_norm(qkv[:, nq : nq + nk].view(t, self.kv_heads, d), eb)
                q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        else:
            q = self.q(x, eb).view(t, self.heads, d)
            k = self.k(x, eb).view(t, self.kv_heads, d)
            v = self.v(x, eb).view(t, self.kv_heads, d)
            if self.q_norm is not None:
                q, k = self.q_norm(q, eb), self.k_norm(k, eb)
            q, k = self.rope.apply(q, cos, sin), self.rope.apply(k, cos, sin)
        write_kv(kv[0], kv[1], k, v, ctx.attention.slot_mapping)
        out = paged_attention(q, kv[0], kv[1], layout, self.window, self.scale,
                              cfg.attn_softcap)  # fmt: skip
        return self.o(out, eb)

    def mlp(self, x, eb: ExpertBatch) -> torch.Tensor:
        if self.moe is not None:
            out = self.moe(x, eb)
            if self.shared is None:
                return out
            gate, up, down, scale = self.shared  # (in transformers' order of operations)
            h = down(self.act(gate(x, eb)) * up(x, eb), eb)
            return out + torch.sigmoid(scale(x, eb)) * h
        gate_up = None if self.fused_gate_up is None else self.fused_gate_up(x, eb)
        if gate_up is None and self.gate_up is not None:  # Phi-3's one projection
            gate_up = self.gate_up(x, eb)
        if gate_up is not None:  # gate columns, then up columns
            gate, up = gate_up.chunk(2, dim=-1)
            return self.down(self.act(gate) * up, eb)
        return self.down(self.act(self.gate(x, eb)) * self.up(x, eb), eb)

    def linears(self) -> list:
        """The attention's, the dense MLP's and a shared expert's linear layers (each a
        MultiExpertLinear, or a RowParallelLinear around one)."""
        out = [self.qkv] if self.qkv is not None else [self.q, self.k, self.v]
        out.append(self.o)
        if self.moe is None:
            out += [self.gate_up] if self.gate_up is not None else [self.gate, self.up]
            out.append(self.down)
        return out + (self.shared or [])

    def norms(self) -> list[RowNorm]:
        out = [self.input_norm, self.post_norm, self.pre_ff_norm, self.post_ff_norm,
               self.q_norm, self.k_norm]  # fmt: skip
        return [n for n in out if n is not None]

    def __call__(self, x, ctx, kv, layout, cos, sin) -> torch.Tensor:
        eb = ctx.experts
        h = self.attention(self.input_norm(x, eb), ctx, kv, layout, cos, sin)
        if self.pre_ff_norm is None:
            x = x + h
            return x + self.mlp(self.post_norm(x, eb), eb)
        x = x + self.post_norm(h, eb)  # Gemma 2
        return x + self.post_ff_norm(self.mlp(self.pre_ff_norm(x, eb), eb), eb)


def _expect_layer(ld: _Loader, cfg: ModelConfig, p: str, i: int) -> None:
    """Layer i's stored attention and dense-MLP shapes against config.json's (whole, before
    any tensor-parallel slicing)."""
    h, kv, d, hid = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
    a = p + "self_attn."
    heads = "num_attention_heads · head_dim, hidden_size"
    kv_heads = "num_key_value_heads · head_dim, hidden_size"
    want = [(p + "input_layernorm.weight", (hid,), "hidden_size")]
    if cfg.fused_proj:
        want.append(
            (
                a + "qkv_proj.weight",
                ((h + 2 * kv) * d, hid),
                "(num_attention_heads + 2 · num_key_value_heads) · head_dim, hidden_size",
            )
        )
    else:
        want += [(a + "q_proj.weight", (h * d, hid), heads),
                 (a + "k_proj.weight", (kv * d, hid), kv_heads),
                 (a + "v_proj.weight", (kv * d, hid), kv_heads)]  # fmt: skip
    want.append((a + "o_proj.weight", (hid, h * d), "hidden_size, num_attention_heads · head_dim"))
    if cfg.qk_norm:
        want += [(a + "q_norm.weight", (d,), "head_dim"), (a + "k_norm.weight", (d,), "head_dim")]
    dense = not (cfg.num_experts and cfg.sparse_layers[i]) and not (
        cfg.moe_layers and cfg.moe_layers[i]
    )
    if dense:
        ffn = cfg.intermediate_size
        if cfg.fused_proj:
            want.append((p + "mlp.gate_up_proj.weight", (2 * ffn, hid),
                         "2 · intermediate_size, hidden_size"))  # fmt: skip
        else:
            want += [
                (p + "mlp.gate_proj.weight", (ffn, hid), "intermediate_size, hidden_size"),
                (p + "mlp.up_proj.weight", (ffn, hid), "intermediate_size, hidden_size"),
            ]
        want.append((p + "mlp.down_proj.weight", (hid, ffn), "hidden_size, intermediate_size"))
    for name, shape, what in want:
        ld.expect(name, shape, what)


def _local_rotary(cfg: ModelConfig, rope: Rotary) -> Rotary | None:
    """Gemma 3's sliding-window layers' RoPE, or None. It must rotate as many channels as the
    global one (their tables are stacked) and not depend on the sequence's length (the
    engine's prefix cache and LongRoPE bookkeeping read the global one)."""
    if cfg.local_rope is None:
        return None
    local = Rotary(cfg.local_rope, cfg.head_dim, cfg.max_position_embeddings)
    if local.kind in LENGTH_DEPENDENT or local.dim != rope.dim:
        raise ConfigError(f"config.json's sliding-window RoPE (rope_parameters"
                          f"['sliding_attention']: {local.kind}, {local.dim} channels) is not "
                          f"served beside the global one ({rope.kind}, {rope.dim} channels): "
                          "only a length-independent local RoPE over the same channels "
                          "is")  # fmt: skip
    return local


def _load_mixtral_moe(prefix: str, cfg: ModelConfig, ld: _Loader):
    from expertswitch.moe.mixtral import MixtralSparseMoE

    names = ld.ckpt.names()
    for block in ("block_sparse_moe.", "mlp."):
        if any(n.startswith(prefix + block) for n in names):
            break
    else:
        raise CheckpointError(f"{ld.ckpt.path}: no MoE tensors under {prefix}")
    moe = MixtralSparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                           cfg.experts_per_token, ld.dtype, ld.device,
                           renormalize=cfg.norm_topk_prob).eval()  # fmt: skip
    shared = prefix + block + "shared_expert"  # (Qwen2-MoE's: loaded as linears apart)
    state = {n[len(prefix + block) :]: ld.get(n) for n in names
             if n.startswith(prefix + block) and not n.startswith(shared)}  # fmt: skip
    moe.load_hf_state_dict(state)
    moe.requires_grad_(False)
    return RowMixtralMoE(prefix + block, moe)


def _load_trained_moe(prefix: str, cfg: ModelConfig, spec, ld: _Loader, ep_size: int = 1):
    """An `expertswitch train` MoE FFN (models/causal_lm.py), served dropless: a request's
    tokens never lose their expert to other requests of the batch (capacity is a training
    device), so the output equals the trained layer's in eval with drop_tokens=False. With
    ep_size > 1 (under torchrun) this rank loads only its E / ep_size experts and routes its
    share of the batch, which every rank holds (MoE.infer(replicated=True))."""
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
    return lambda x, eb: moe.infer(x, replicated=ep_size > 1)  # (no expert changes it)


class Decoder:
    def __init__(self, cfg: ModelConfig, ckpt: Checkpoint, device, dtype, ep_size: int = 1,
                 tp_size: int = 1):  # fmt: skip
        """ep_size, tp_size > 1 (under torchrun): every rank of the groups must run every
        forward pass on the same tokens (the engine's lockstep); a rank with other tokens
        would get wrong outputs, not an error."""
        self.cfg, self.device, self.dtype = cfg, torch.device(device), dtype
        if dtype == torch.float16 and cfg.model_type in _FP16_OVERFLOWS:
            log.warning("%s in float16: its activations can overflow float16 (inf or NaN "
                        "logits); serve it in bfloat16 or float32", cfg.model_type)  # fmt: skip
        for what, size in (("ep_size", ep_size), ("tp_size", tp_size)):
            if not isinstance(size, int) or size < 1:
                raise ConfigError(f"{what} must be a positive integer, got {size!r}")
        if tp_size > 1 and cfg.fused_proj:
            raise ConfigError(f"{cfg.model_type}'s fused qkv_proj and gate_up_proj are not "
                              "sliced over ranks yet: leave tensor_parallel_size at 1")  # fmt: skip
        kv = cfg.num_kv_heads
        if tp_size > kv and tp_size % kv:
            raise ConfigError(f"num_key_value_heads={kv} neither splits over nor replicates "
                              f"evenly across tensor_parallel_size {tp_size}: choose a size "
                              "that divides it or a multiple of it")  # fmt: skip
        self.kv_heads = max(kv // tp_size, 1)  # this rank's (one, replicated, past kv ranks)
        if tp_size <= kv:
            _split(kv, tp_size, "num_key_value_heads")
        if tp_size > 1:
            _split(cfg.num_heads, tp_size, "num_attention_heads")
            if not all(cfg.sparse_layers or cfg.moe_layers or [None]):  # dense MLPs (MoE
                _split(cfg.intermediate_size, tp_size, "intermediate_size")  # layers: whole)
        self.tp = TensorSlices(tp_size) if tp_size > 1 else None
        if ep_size > 1 and not any(cfg.sparse_layers) and not any(cfg.moe_layers or []):
            raise ConfigError("expert parallelism spreads the experts of an expertswitch_moe "
                              "checkpoint's MoE layers, and this one has none: leave "
                              "expert_parallel_size at 1")  # fmt: skip
        ld = _Loader(ckpt, device, dtype, self.tp)
        self.rope = Rotary(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.local_rope = _local_rotary(cfg, self.rope)
        ld.expect("model.embed_tokens.weight", (cfg.vocab_size, cfg.hidden_size),
                  "vocab_size, hidden_size")  # fmt: skip
        self.embed = RowEmbedding("model.embed_tokens.weight", ld.get("model.embed_tokens.weight"),
                                  cfg.embed_scale)  # fmt: skip
        self.layers = [DecoderLayer(i, cfg, ld, self.rope, ep_size)
                       for i in range(cfg.num_layers)]  # fmt: skip
        self.norm = ld.norm("model.norm.weight", cfg)
        if cfg.tie_word_embeddings or "lm_head.weight" not in ckpt:
            # tied: an expert's changed embedding is its lm_head too (same tensor name)
            # (a LoRA adapter's lm_head factors are its own, not the embedding's)
            self.lm_head = MultiExpertLinear("model.embed_tokens.weight", self.embed.weight,
                                             fill=float("-inf"),
                                             lora_name="lm_head.weight")  # fmt: skip
        else:
            self.lm_head = ld.linear("lm_head", fill=float("-inf"))
        self.shapes = {n: ckpt.shape(n) for n in ckpt.names()}
        # the language model of an image-and-text checkpoint (Decoder.load): tensors named
        # apart from the checkpoint's (text_name)
        self.multimodal = isinstance(ckpt, TextView)
        self.sliced = ld.sliced
        self.parallel_moe = ep_size > 1  # MoE layers exchange tokens between ranks

    def slice_expert(self, w):
        """An expert's weights (models/expert_weights.ExpertWeights) cut like the base under
        tensor parallelism: this rank's rows or input channels of each sliced tensor's delta or
        exact replacement; the rest whole. Identity without tensor parallelism."""
        if self.tp is None:
            return w
        from expertswitch.models.expert_weights import ExpertWeights

        tp = self.tp

        deltas, exact, lora = {}, {}, {}
        for name, p in w.lora.items():  # rows: B's output rows; cols: A's input columns (each
            how, part = self.sliced.get(name, (None, None))  # rank's partial x·Aᵀ is summed
            if how == "rows":  # by the layer's all-reduce with its partial base product)
                p = replace(p, b=tp.rows(p.b, part))
            elif how == "cols":
                p = replace(p, a=tp.cols(p.a, part))
            lora[name] = p
        for name, d in w.deltas.items():
            how, part = self.sliced.get(name, (None, None))
            if how == "rows":
                d = d.rows(*tp.span(d.shape[0], part))
            elif how == "cols":
                try:
                    d = d.cols(*tp.span(d.shape[1], part))
                except ConfigError as e:  # the same words on every rank (they compare errors)
                    raise ConfigError(f"expert {w.name!r}, tensor {name}: {e}, so it cannot be "
                                      f"split over tensor_parallel_size {tp.size}: compress it "
                                      "with a smaller group_size, or serve it with another "
                                      "tensor_parallel_size") from None  # fmt: skip
            deltas[name] = d
        for name, t in w.exact.items():
            how, part = self.sliced.get(name, (None, None))
            exact[name] = (tp.rows(t, part) if how == "rows" else tp.cols(t, part)
                           if how == "cols" else t)  # fmt: skip
        return ExpertWeights(
            w.name, w.path, deltas, exact, lora=lora, lora_embedding=w.lora_embedding
        )

    def text_name(self, stored: str) -> str | None:
        """The name this model gives a tensor stored under `stored` in its checkpoint (and so
        in an expert's archive or a LoRA adapter made from it): itself, or for an
        image-and-text checkpoint its language model's name, None for the vision tower's and
        the projector's (not served: the engine reads text)."""
        return text_name(stored) if self.multimodal else stored

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """The linear layers a LoRA adapter may change, by the name PEFT gives their weight
        ("lm_head.weight" also when tied to the embedding): their whole [N, K]."""
        out = {self.lm_head.lora_name: tuple(self.shapes[self.lm_head.name])}
        for layer in self.layers:
            out.update((lin.name, tuple(self.shapes[lin.name])) for lin in layer.linears())
        return out

    def servable_names(self) -> set[str]:
        """Tensor names an expert may change: every one a layer applies per row."""
        names = {self.embed.name, self.norm.name, self.lm_head.name}
        for layer in self.layers:
            names |= {n.name for n in layer.norms()}
            if isinstance(layer.moe, RowMixtralMoE):
                names |= layer.moe.names
            for lin in layer.linears():
                names |= {lin.name, lin.bias_name}
        return names

    @classmethod
    def load(cls, path: str | Path, device="cpu", dtype=torch.float32, ep_size: int = 1,
             tp_size: int = 1) -> Decoder:  # fmt: skip
        ckpt = text_view(open_checkpoint(path))  # (an image-and-text one: its language model)
        return cls(ModelConfig.from_dict(ckpt.config), ckpt, device, dtype, ep_size, tp_size)

    @classmethod
    def from_tensors(cls, config: dict, tensors: dict[str, torch.Tensor], device="cpu",
                     dtype=torch.float32) -> Decoder:  # fmt: skip
        """From in-memory tensors named as in an HF checkpoint (benchmarks, synthetic models)."""
        return cls(ModelConfig.from_dict(config), TensorDict(tensors), device, dtype)

    def new_kv_cache(self, num_blocks: int, block_size: int, dtype=None):
        """One (keys, values) pair per layer, each [num_blocks, block_size, kv_heads, D]
        (this rank's kv heads under tensor parallelism)."""
        cfg = self.cfg
        shape = (num_blocks, block_size, self.kv_heads, cfg.head_dim)
        dt = dtype or self.dtype
        return [(torch.zeros(shape, dtype=dt, device=self.device),
                 torch.zeros(shape, dtype=dt, device=self.device))
                for _ in range(cfg.num_layers)]  # fmt: skip

    def kv_bytes_per_token(self, dtype=None) -> int:
        el = torch.empty((), dtype=dtype or self.dtype).element_size()
        return 2 * self.cfg.num_layers * self.kv_heads * self.cfg.head_dim * el

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, ctx: StepContext, kv_cache) -> torch.Tensor:
        """ids [T] (rows of all sequences, in order) → final hidden states [T, H]."""
        ab = ctx.attention
        layout = PaddedLayout.build(ab)
        cos, sin = self.cos_sin(ab.positions, ab.seq_lens)
        return self.run_layers(self.embed(ids, ctx.experts), ctx, kv_cache, layout, cos, sin)

    def cos_sin(self, positions: torch.Tensor, seq_lens: torch.Tensor | None = None):
        """The rows' rotations, fp32: cos, sin [T, D]; with a local RoPE (Gemma 3) both
        stacked [2, T, D], the global one first (each layer picks its own)."""
        cos, sin = self.rope.cos_sin(positions, seq_lens)
        if self.local_rope is None:
            return cos, sin
        lcos, lsin = self.local_rope.cos_sin(positions, seq_lens)
        return torch.stack([cos, lcos]), torch.stack([sin, lsin])

    @torch.inference_mode()
    def run_layers(self, x, ctx: StepContext, kv_cache, layout, cos, sin) -> torch.Tensor:
        """Embedded rows [T, H] through every layer (what engine/graphs.py captures)."""
        for layer, kv in zip(self.layers, kv_cache):
            x = layer(x, ctx, kv, layout, cos, sin)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor, eb: ExpertBatch) -> torch.Tensor:
        """hidden [B, H] (one row per sequence) → fp32 logits [B, V] (V: the widest active
        vocabulary; columns past a row's own vocabulary are −inf). Gemma 2 caps them:
        cap·tanh(logits / cap) in the model dtype, as transformers does (−inf columns stay)."""
        logits = self.lm_head(self.norm(hidden, eb), eb)
        cap = self.cfg.final_softcap
        if cap is not None:
            logits = torch.where(torch.isneginf(logits), logits,
                                 torch.tanh(logits / cap) * cap)  # fmt: skip
        return logits.float()


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
