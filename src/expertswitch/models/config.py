"""`ModelConfig`: the decoder's shape, read from a Hugging Face `config.json` (Llama, Mistral,
Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE, Phi-3, Gemma, Gemma 2, Gemma 3's text model (also the
language model of its image-and-text checkpoints), Mixtral, and
`expertswitch_moe`: a
Llama-shaped model whose listed layers have a DeepSpeed-style MoE FFN, as `expertswitch train`
writes it), without transformers. Validates itself; unknown families get a clear error."""

from __future__ import annotations

from dataclasses import dataclass, field

from expertswitch.errors import ConfigError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "gemma",
             "gemma2", "gemma3_text", "mixtral", "expertswitch_moe")  # fmt: skip
_GEMMA = ("gemma", "gemma2", "gemma3_text")
_SPARSE = ("mixtral", "qwen2_moe", "qwen3_moe")  # families whose MoE FFN is Mixtral's block
_QWEN_MOE = ("qwen2_moe", "qwen3_moe")  # routing options, dense layers (mlp_only_layers, ...)
# transformers' defaults where config.json leaves the key out (Qwen3's head_dim is not
# hidden / heads)
_DEFAULT_HEAD_DIM = {"qwen3": 128, "qwen3_moe": 128, "gemma": 256, "gemma2": 256,
                     "gemma3_text": 256}  # fmt: skip
_MAX_POSITIONS = {"gemma": 8192, "gemma2": 8192, "gemma3_text": 131072}  # (others: 2048)
_MOE_FFN_DEFAULT = {"qwen2_moe": 1408, "qwen3_moe": 768}
_QWEN3 = ("qwen3", "qwen3_moe")
_ACTIVATIONS = ("silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclass
class ModelConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    # Gemma 3: the sliding-window layers' own RoPE (its local base frequency, unscaled); None:
    # every layer rotates by `rope`
    local_rope: dict | None = None
    local_layers: list[bool] = field(default_factory=list)  # per layer: rotates by local_rope
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: q/k/v biases; Llama's attention_bias: q/k/v and o
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k before RoPE
    fused_proj: bool = False  # Phi-3: one qkv_proj (q, k, v rows) and one gate_up_proj
    # Gemma: norms multiply by (1 + weight) in fp32 (weights stored as w − 1), embeddings are
    # scaled by √hidden; Gemma 2 also: sandwich norms (the attention's and the MLP's outputs
    # normed before the residual add, a norm before the MLP), the attention scaled by
    # query_pre_attn_scalar^−½, and attention scores and logits soft-capped: cap·tanh(s / cap);
    # Gemma 3 as Gemma 2 with q/k norms, caps off by default and two RoPEs (local_rope)
    norm_offset: float = 0.0
    embed_scale: float = 1.0
    sandwich_norms: bool = False
    attn_scale: float | None = None  # None: head_dim^−½
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # per layer: None = full attention, else the window (a token sees itself and window−1 before)
    sliding_windows: list[int | None] = field(default_factory=list)
    num_experts: int = 0  # Mixtral's / Qwen3-MoE's FFN experts (0 = dense MLP)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # each expert's FFN width (0: intermediate_size)
    norm_topk_prob: bool = True  # the top-k routing weights renormalised (Qwen-MoE: optional)
    # Qwen2-MoE: a dense SwiGLU "shared expert" beside the routed ones in every MoE block,
    # scaled by sigmoid(x·gᵀ) (shared_expert_gate, one output); 0 = none
    shared_expert_intermediate_size: int = 0
    # per layer: whether its FFN is the MoE block (Qwen3-MoE's mlp_only_layers and
    # decoder_sparse_step leave some dense); default with experts: every layer
    sparse_layers: list[bool] = field(default_factory=list)
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    # expertswitch_moe: per layer None (dense SwiGLU MLP) or the MoE FFN's spec
    moe_layers: list[MoELayerSpec | None] = field(default_factory=list)

    def __post_init__(self):
        _check_type(self.model_type)
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads "
                f"{self.num_kv_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported ({_ACTIVATIONS})")
        if not self.sliding_windows:
            self.sliding_windows = [None] * self.num_layers
        if self.num_experts:
            self.sparse_layers = self.sparse_layers or [True] * self.num_layers
            self.moe_intermediate_size = self.moe_intermediate_size or self.intermediate_size
            if not 1 <= self.experts_per_token <= self.num_experts:
                raise ConfigError(f"num_experts_per_tok {self.experts_per_token} must be from 1 "
                                  f"to the number of experts, {self.num_experts}")  # fmt: skip
            if len(self.sparse_layers) != self.num_layers:
                raise ConfigError("one sparse-layer entry per layer is needed")
        if len(self.sliding_windows) != self.num_layers:
            raise ConfigError("one sliding-window entry per layer is needed")
        if self.local_rope is not None and len(self.local_layers) != self.num_layers:
            raise ConfigError("a local RoPE needs one local_layers entry per layer")
        if self.moe_layers and len(self.moe_layers) != self.num_layers:
            raise ConfigError(f"moe_layers lists {len(self.moe_layers)} layers, the model has "
                              f"{self.num_layers}: one entry (null = dense) per layer")  # fmt: skip
        if any(self.moe_layers) and self.hidden_act not in ("silu", "swish"):
            raise ConfigError("MoE layers use SwiGLU experts: set hidden_act to 'silu'")

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        """From a config.json's dict (an image-and-text Gemma 3's: its language model's)."""
        cfg = text_config(cfg)
        mt = cfg.get("model_type")
        _check_type(mt)  # before reading fields whose absence would mislead
        try:
            hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
            layers = cfg["num_hidden_layers"]
            eos = cfg.get("eos_token_id")
            return cls(
                model_type=mt,
                hidden_size=hidden,
                intermediate_size=cfg["intermediate_size"],
                num_layers=layers,
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                # (transformers' Qwen3 configs default head_dim to 128, not hidden / heads)
                head_dim=cfg.get("head_dim") or _DEFAULT_HEAD_DIM.get(mt, hidden // heads),
                vocab_size=cfg["vocab_size"],
                max_position_embeddings=_max_positions(cfg),
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                hidden_act=_activation(cfg, mt),
                rope=_rope_params(cfg),
                local_rope=_local_rope(cfg, mt),
                local_layers=_gemma3_sliding(cfg, layers) if mt == "gemma3_text" else [],
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", mt in _GEMMA)),
                **_gemma_fields(cfg, mt, hidden),
                qkv_bias=_qkv_bias(cfg, mt),
                o_bias=mt not in ("qwen2", "qwen2_moe") and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                qk_norm=mt in (*_QWEN3, "gemma3_text"),
                fused_proj=mt == "phi3",
                sliding_windows=_sliding_windows(cfg, mt, layers),
                num_experts=_num_experts(cfg) if mt in _SPARSE else 0,
                experts_per_token=_experts_per_token(cfg, mt) if mt in _SPARSE else 0,
                moe_intermediate_size=(cfg.get("moe_intermediate_size") or _MOE_FFN_DEFAULT[mt])
                if mt in _MOE_FFN_DEFAULT
                else 0,
                norm_topk_prob=mt not in _QWEN_MOE or bool(cfg.get("norm_topk_prob", False)),
                shared_expert_intermediate_size=_shared_width(cfg, mt),
                sparse_layers=_sparse_layers(cfg, mt, layers),
                eos_token_ids=[] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                bos_token_id=cfg.get("bos_token_id"),
                moe_layers=_moe_layers(cfg, mt, layers),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks {e.args[0]!r}; it is not a complete "
                              f"{mt} config") from None  # fmt: skip

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class MoELayerSpec:
    """One MoE FFN (moe/layer.py MoE.stacked): SwiGLU experts of intermediate_size, DeepSpeed's
    gate options, optionally Residual-MoE."""

    num_experts: int
    k: int = 1
    use_residual: bool = False
    capacity_factor: float = 1.0
    eval_capacity_factor: float = 1.0
    min_capacity: int = 4
    drop_tokens: bool = True
    noisy_gate_policy: str | None = None
    use_rts: bool = True

    def __post_init__(self):
        if self.num_experts < 1 or not 1 <= self.k <= self.num_experts:
            raise ConfigError(f"an MoE layer needs num_experts ≥ 1 and 1 ≤ k ≤ num_experts, got "
                              f"num_experts={self.num_experts}, k={self.k}")  # fmt: skip
        if self.capacity_factor <= 0 or self.eval_capacity_factor <= 0 or self.min_capacity < 0:
            raise ConfigError("capacity factors must be > 0 and min_capacity ≥ 0")
        if self.noisy_gate_policy not in (None, "Jitter", "RSample"):
            raise ConfigError(f"noisy_gate_policy {self.noisy_gate_policy!r}: choose None, "
                              "'Jitter' or 'RSample'")  # fmt: skip

    @classmethod
    def from_dict(cls, d: dict, where: str = "an MoE layer") -> MoELayerSpec:
        from typing import get_type_hints

        from expertswitch.utils.typed import coerce

        if not isinstance(d, dict):
            raise ConfigError(f"{where} must be a mapping of MoE options (or null), got {d!r}")
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown MoE layer options {sorted(map(str, unknown))}: known are "
                              f"{sorted(cls.__dataclass_fields__)}")  # fmt: skip
        if "num_experts" not in d:
            raise ConfigError(f"{where} needs num_experts")
        hints = get_type_hints(cls)
        return cls(**{k: coerce(v, hints[k], f"{where}: {k}") for k, v in d.items()})

    def to_dict(self) -> dict:
        return {f: getattr(self, f) for f in self.__dataclass_fields__}


def _moe_layers(cfg: dict, mt: str, layers: int) -> list[MoELayerSpec | None]:
    if mt != "expertswitch_moe":
        return []
    entries = cfg.get("moe_layers")
    if not isinstance(entries, list) or len(entries) != layers:
        raise ConfigError(f"an expertswitch_moe config.json needs moe_layers, a list of "
                          f"{layers} entries (null: dense, else MoE layer options)")  # fmt: skip
    return [None if e is None else MoELayerSpec.from_dict(e, f"moe_layers[{i}]")
            for i, e in enumerate(entries)]  # fmt: skip


# transformers' (num experts, experts per token) where config.json leaves them out
_MOE_DEFAULTS = {"mixtral": (8, 2), "qwen2_moe": (60, 4), "qwen3_moe": (128, 8)}


def _num_experts(cfg: dict) -> int:
    """The MoE block's experts: num_local_experts (transformers 5) or num_experts (4.x), else
    the family's default (0 given: a dense model)."""
    for key in ("num_local_experts", "num_experts"):
        if cfg.get(key) is not None:
            return cfg[key]
    return _MOE_DEFAULTS.get(cfg.get("model_type"), (0, 0))[0]


def _experts_per_token(cfg: dict, mt: str) -> int:
    k = cfg.get("num_experts_per_tok")
    return _MOE_DEFAULTS[mt][1] if k is None else k


def _sparse_layers(cfg: dict, mt: str, layers: int) -> list[bool]:
    """Qwen2-/Qwen3-MoE: layer i is sparse unless listed in mlp_only_layers, every
    decoder_sparse_step-th layer (transformers' rule); other families: [] (the default)."""
    if mt not in _QWEN_MOE or not _num_experts(cfg):
        return []
    dense = set(cfg.get("mlp_only_layers") or [])
    step = cfg.get("decoder_sparse_step") or 1
    return [i not in dense and (i + 1) % step == 0 for i in range(layers)]


def _activation(cfg: dict, mt: str) -> str:
    """hidden_act, as transformers 5 reads it: Gemma 2 names it hidden_activation (taken as
    written), and Gemma's legacy "gelu" means the tanh approximation its checkpoints were
    trained with."""
    if mt in ("gemma2", "gemma3_text"):
        return cfg.get("hidden_activation") or "gelu_pytorch_tanh"
    if mt == "gemma":
        act = cfg.get("hidden_act") or "gelu_pytorch_tanh"
        return "gelu_pytorch_tanh" if act == "gelu" else act
    return cfg.get("hidden_act", "silu")


def _gemma_fields(cfg: dict, mt: str, hidden: int) -> dict:
    if mt not in _GEMMA:
        return {}
    if cfg.get("use_bidirectional_attention"):
        raise ConfigError(f"this {mt} config uses bidirectional attention (an embedding "
                          "model): the engine serves causal language models")  # fmt: skip
    out = {"norm_offset": 1.0, "embed_scale": hidden**0.5}
    if mt != "gemma":  # (transformers' defaults where config.json leaves them out: Gemma 2
        caps = (50.0, 30.0) if mt == "gemma2" else (None, None)  # caps, Gemma 3's none)
        scalar = _positive(cfg, "query_pre_attn_scalar", 256)
        out.update(sandwich_norms=True, attn_scale=None if scalar is None else scalar**-0.5,
                   attn_softcap=_positive(cfg, "attn_logit_softcapping", caps[0]),
                   final_softcap=_positive(cfg, "final_logit_softcapping", caps[1]))  # fmt: skip
    if mt == "gemma3_text":  # transformers' Gemma 3 attention never applies the score cap its
        out["attn_softcap"] = None  # config may name (its logits cap, it does)
    return out


def _positive(cfg: dict, key: str, default: float) -> float | None:
    """A positive number from config.json (null: None, i.e. off), or a clear error."""
    v = cfg.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf"):
        raise ConfigError(f"config.json's {key} must be a positive number (or null), got {v!r}")
    return float(v)


def _shared_width(cfg: dict, mt: str) -> int:
    """Qwen2-MoE's shared expert width: 5632 when left out, intermediate_size when null (as
    transformers 4.x builds it); 0 (none) for other families."""
    if mt != "qwen2_moe" or not _num_experts(cfg):
        return 0
    width = cfg.get("shared_expert_intermediate_size", 5632)
    return cfg["intermediate_size"] if width is None else width


def _window_layers(cfg: dict) -> int:
    first = cfg.get("max_window_layers", 28)  # (transformers' default)
    if isinstance(first, bool) or not isinstance(first, int):
        raise ConfigError(f"config.json's max_window_layers must be an integer, got {first!r}")
    return first


def _qkv_bias(cfg: dict, mt: str) -> bool:
    """Qwen2: q/k/v biases always; Qwen2-MoE: its qkv_bias (True when left out); others:
    Llama's attention_bias (q/k/v and o)."""
    if mt == "qwen2":
        return True
    if mt == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))


# transformers' Gemma3TextConfig defaults for the keys from_dict needs: an image-and-text Gemma 3
# checkpoint's text_config may list only what differs from them (google/gemma-3-4b-it's gives
# its sizes, layer count, rope_scaling and window); the rest default as for any gemma3_text
_GEMMA3_TEXT_SIZES = {"vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216,
                      "num_hidden_layers": 26, "num_attention_heads": 8,
                      "num_key_value_heads": 4, "eos_token_id": 1, "bos_token_id": 2}  # fmt: skip
# what an image-and-text checkpoint adds beside its language model: served as text only
MULTIMODAL = ("gemma3",)


def text_config(cfg: dict) -> dict:
    """The config of the language model a checkpoint's config.json describes: itself, or for
    Gemma 3's image-and-text checkpoints (model_type "gemma3", saved as
    Gemma3ForConditionalGeneration: gemma-3-4b/12b/27b) its text_config over transformers'
    defaults. The engine serves such a checkpoint's language model (io/checkpoint.text_view
    names its tensors); images are not read."""
    if not isinstance(cfg, dict) or cfg.get("model_type") not in MULTIMODAL:
        return cfg
    text = cfg.get("text_config", {})
    if not isinstance(text, dict) or text.get("model_type", "gemma3_text") != "gemma3_text":
        raise ConfigError("config.json's text_config must be an object describing Gemma 3's "
                          "language model (model_type 'gemma3_text'); the checkpoint's "
                          "config.json is damaged: re-download or re-save it")  # fmt: skip
    # token ids the top level gives and text_config leaves out; the lm_head tied only if
    # neither level unties it (transformers 5 reads the top level's, 4.x text_config's; the
    # decoder ties anyway when no lm_head tensor is stored)
    ids = {k: cfg[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id") if k in cfg}
    tied = bool(cfg.get("tie_word_embeddings", True)) and bool(
        text.get("tie_word_embeddings", True)
    )
    return {**_GEMMA3_TEXT_SIZES, **ids, **text, "model_type": "gemma3_text",
            "tie_word_embeddings": tied}  # fmt: skip


def _check_type(model_type) -> None:
    if model_type not in SUPPORTED:
        raise ConfigError(f"model_type {model_type!r} is not supported: the engine serves "
                          f"{', '.join(SUPPORTED)} checkpoints")  # fmt: skip


def _rope_params(cfg: dict) -> dict:
    """transformers 5 writes `rope_parameters` (with rope_theta inside; Gemma 3: one per layer
    type, this is the full-attention layers', with a top-level rope_scaling merged in as
    transformers does); 4.x writes `rope_theta` and an optional `rope_scaling`. Either way:
    one dict with rope_type and rope_theta."""
    params = _per_layer_type(cfg, "full_attention")
    if params is None:
        params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    else:
        params = {**params, **(cfg.get("rope_scaling") or {})}
    theta = 1_000_000.0 if cfg.get("model_type") == "gemma3_text" else 10000.0
    params = _rope_kind(params, cfg, cfg.get("rope_theta", theta))
    if cfg.get("model_type") == "phi3" and params["rope_type"] in ("su", "yarn"):
        params["rope_type"] = "longrope"  # (transformers' Phi3Config renames them so)
    if params["rope_type"] == "longrope":  # Phi-3: the pretrained length, top-level first
        top = cfg.get("original_max_position_embeddings")
        if top:
            params["original_max_position_embeddings"] = top
        params.setdefault("original_max_position_embeddings", 4096)  # (Phi3Config's default)
    if "partial_rotary_factor" in cfg:  # (Phi-3 mini 4: top-level in transformers 4.x)
        params.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    params.setdefault("max_position_embeddings", _max_positions(cfg))
    return params


def _rope_kind(params: dict, cfg: dict, theta: float) -> dict:
    """A copy of one RoPE's parameters with rope_type (4.x: `type`) and rope_theta set, and
    the pretrained length of llama3 / yarn scaling (transformers' default: the config's)."""
    params = dict(params)
    params["rope_type"] = params.get("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", theta)
    if params["rope_type"] in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return params


def _max_positions(cfg: dict) -> int:
    return cfg.get("max_position_embeddings", _MAX_POSITIONS.get(cfg.get("model_type"), 2048))


def _per_layer_type(cfg: dict, layer_type: str) -> dict | None:
    """transformers 5's Gemma 3 `rope_parameters`: {layer type: that type's parameters}; None
    for any other layout (one dict for all layers, or none)."""
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict) or not {"full_attention", "sliding_attention"} & set(params):
        return None
    one = params.get(layer_type)
    if one is not None and not isinstance(one, dict):
        raise ConfigError(f"config.json's rope_parameters[{layer_type!r}] must be a mapping, "
                          f"got {one!r}")  # fmt: skip
    return one or {}


def _local_rope(cfg: dict, mt: str) -> dict | None:
    """Gemma 3's sliding-window layers' RoPE: transformers 5's rope_parameters
    ["sliding_attention"], or 4.x's rope_local_base_freq, unscaled (rope_scaling is the
    global layers'); None for other families."""
    if mt != "gemma3_text":
        return None
    params = _per_layer_type(cfg, "sliding_attention") or {"rope_type": "default"}
    return _rope_kind(params, cfg, cfg.get("rope_local_base_freq", 10000.0))


def _gemma3_sliding(cfg: dict, layers: int) -> list[bool]:
    """Gemma 3's sliding-window layers: its layer_types, else every layer but each
    sliding_window_pattern-th (6 when left out), as transformers reads them."""
    types = cfg.get("layer_types")
    kinds = ("sliding_attention", "full_attention")
    if types is not None:
        if not isinstance(types, list) or len(types) != layers or not set(types) <= set(kinds):
            raise ConfigError(f"config.json's layer_types must list {layers} entries, each "
                              f"one of {kinds}, got {types!r}")  # fmt: skip
        return [t == "sliding_attention" for t in types]
    pattern = cfg.get("sliding_window_pattern", 6)
    if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
        raise ConfigError(f"config.json's sliding_window_pattern must be a positive integer, "
                          f"got {pattern!r}")  # fmt: skip
    return [(i + 1) % pattern != 0 for i in range(layers)]


def _sliding_windows(cfg: dict, mt: str, layers: int) -> list[int | None]:
    window = cfg.get("sliding_window")
    if mt in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and not cfg.get(
        "use_sliding_window", False
    ):
        window = None
    if mt == "qwen3_moe":  # transformers windows every layer (no max_window_layers there)
        return [window] * layers
    if mt == "gemma":
        return [None] * layers
    if mt in ("gemma2", "gemma3_text") and "sliding_window" not in cfg:
        window = 4096  # (transformers' default)
    if mt == "gemma3_text":
        local = _gemma3_sliding(cfg, layers)
        if window is None and any(local):  # (transformers cannot build its mask then)
            raise ConfigError("this gemma3_text config has sliding-attention layers but "
                              "sliding_window is null: give the window (its checkpoints use "
                              "512 or 1024)")  # fmt: skip
        return [window if s else None for s in local]
    types = cfg.get("layer_types")
    if types and len(types) == layers and mt != "mistral":  # Mistral windows every layer
        return [window if t == "sliding_attention" else None for t in types]
    if mt == "gemma2":  # transformers: the even layers windowed
        return [window if i % 2 == 0 else None for i in range(layers)]
    if mt == "qwen2_moe" and window is not None:  # transformers 5's rule (deliberately: the
        first = _window_layers(cfg)  # tokens are compared with it), even layers below it
        return [window if i % 2 == 0 and i < first else None for i in range(layers)]
    if mt in ("qwen2", "qwen3") and window is not None:
        first = _window_layers(cfg)
        return [window if i >= first else None for i in range(layers)]
    return [window] * layers
