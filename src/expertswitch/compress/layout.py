"""Which of a checkpoint's tensors are linear weights, read from the model's own modules.

Names are not enough: GPT-2's `c_attn` / `c_fc`, OPT's `out_proj`, DeepSeek's `q_a_proj` and
`kv_b_proj`, and every architecture still to come have their own. So the model is built from its
config on the meta device (no memory, no weights) and its modules are asked:

    nn.Linear                   weight [out, in]: input channels are columns
    transformers' Conv1D        weight [in, out] (GPT-2 and kin): input channels are rows, so
                                its delta is quantized transposed and stored with
                                `transposed: true`
    stacked experts [E, N, K]   fused MoE parameters (Mixtral, Qwen2-MoE in transformers 5),
                                found by their names `gate_up_proj` / `down_proj` / `w1|w2|w3`

Kept exact on purpose, each with its reason: MoE routers (`gate`, `router`,
`shared_expert_gate`: a few rows that decide where every token goes), the token embedding and the
output head (unless embeddings are quantized too), and everything that is not a matrix (norms,
biases). A config transformers cannot build falls back to the names of the usual families, and
says so.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

OUT_IN, IN_OUT = "out_in", "in_out"
ROUTER_NAMES = ("gate", "router", "shared_expert_gate", "classifier", "score")

_STACKED = re.compile(r"\.(gate_up_proj|down_proj|w1|w2|w3|up_proj|gate_proj)(\.weight)?$")
# the fallback when transformers cannot build the model from its config
_LINEAR_NAMES = re.compile(
    r"\.(q_proj|k_proj|v_proj|o_proj|qkv_proj|gate_proj|up_proj|down_proj|gate_up_proj|out_proj|"
    r"w1|w2|w3|fc1|fc2|dense|query_key_value|dense_h_to_4h|dense_4h_to_h|q_a_proj|q_b_proj|"
    r"kv_a_proj_with_mqa|kv_b_proj)(\.weight)?$"
)
_EMBEDDING_NAMES = re.compile(r"(embed_tokens|lm_head|wte|word_embeddings|embed_out)\.weight$")


@dataclass
class LinearLayout:
    """Tensor name → orientation of every linear weight; the names of the embedding-like
    tensors (input embedding, output head) and of the routers; where it came from."""

    linear: dict[str, str] = field(default_factory=dict)
    embeddings: set[str] = field(default_factory=set)
    routers: set[str] = field(default_factory=set)
    source: str = "modules"
    params: set[str] = field(default_factory=set)  # the model's parameter names

    def orientation(self, name: str, shape: tuple[int, ...], embeddings: bool) -> str | None:
        """OUT_IN / IN_OUT when the delta of `name` is quantized, None when it is stored
        exactly (when it changed)."""
        if self.is_router(name):
            return None
        if name in self.embeddings or _EMBEDDING_NAMES.search(name):
            return OUT_IN if embeddings and len(shape) == 2 else None
        if len(shape) in (2, 3) and name in self.linear:
            return self.linear[name]
        if len(shape) == 3 and _STACKED.search(name):
            return OUT_IN  # [E, N, K]: each expert an [out, in] matrix
        if len(shape) in (2, 3) and _LINEAR_NAMES.search(name):
            # a known linear name the modules do not show: e.g. a Mixtral checkpoint saved with
            # per-expert w1/w2/w3 that transformers 5 fuses when it loads
            return OUT_IN
        return None

    def is_router(self, name: str) -> bool:
        """A router by its module, or by its checkpoint name (a Mixtral checkpoint's
        `block_sparse_moe.gate` is `mlp.gate` among transformers 5's modules)."""
        parts = name.rsplit(".", 2)
        return name in self.routers or (len(parts) == 3 and parts[-1] == "weight"
                                        and parts[-2] in ROUTER_NAMES)  # fmt: skip

    def why_exact(self, name: str, shape: tuple[int, ...]) -> str:
        if self.is_router(name):
            return "MoE router"
        if name in self.embeddings or _EMBEDDING_NAMES.search(name):
            return "embedding / output head"
        if len(shape) < 2:
            return "norm / bias / vector"
        return "not a linear layer"


def linear_layout(model_dir: str | Path) -> LinearLayout:
    """The layout of the checkpoint at `model_dir`, from its modules (see the module doc)."""
    try:
        model = _meta_model(Path(model_dir))
    except Exception as e:  # noqa: BLE001 — any failure to build: fall back to names, loudly
        warnings.warn(f"transformers cannot build {model_dir} from its config ({e}); linear "
                      "layers are found by the usual names only", stacklevel=2)  # fmt: skip
        return LinearLayout(source="names")
    import torch
    from transformers.pytorch_utils import Conv1D

    layout = LinearLayout(params={n for n, _ in model.named_parameters(remove_duplicate=False)})
    hidden = getattr(model.config.get_text_config(), "hidden_size", None)
    outputs = model.get_output_embeddings()
    inputs = model.get_input_embeddings()
    for mod_name, mod in model.named_modules():
        weight = f"{mod_name}.weight" if mod_name else "weight"
        if mod is outputs or mod is inputs or isinstance(mod, torch.nn.Embedding):
            layout.embeddings.add(weight)
        elif mod_name.rsplit(".", 1)[-1] in ROUTER_NAMES or "Router" in type(mod).__name__:
            layout.routers.add(weight)  # an nn.Linear or its own class (Qwen2-MoE's TopKRouter)
        elif isinstance(mod, torch.nn.Linear):
            layout.linear[weight] = OUT_IN
        elif isinstance(mod, Conv1D):
            layout.linear[weight] = IN_OUT
        else:
            _stacked_experts(mod, mod_name, hidden, layout)
    return layout


def _stacked_experts(mod, mod_name: str, hidden: int | None, layout: LinearLayout) -> None:
    """Fused experts [E, A, B]: [E, out, in] (Mixtral, Qwen2-MoE in transformers 5) or
    [E, in, out] (Llama 4), told apart by where the hidden size sits — gate_up_proj reads
    the hidden state, down_proj writes it. When both dims are the hidden size, [E, out, in]."""
    import torch

    for pname, role in (("gate_up_proj", "in"), ("down_proj", "out")):
        p = getattr(mod, pname, None)
        if not isinstance(p, torch.Tensor) or p.dim() != 3 or hidden is None:
            continue
        a, b = p.shape[1], p.shape[2]
        if role == "in":
            orient = IN_OUT if a == hidden and b != hidden else OUT_IN
        else:
            orient = IN_OUT if b == hidden and a != hidden else OUT_IN
        layout.linear[f"{mod_name}.{pname}"] = orient


def _meta_model(model_dir: Path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
