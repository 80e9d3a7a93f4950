"""Mixture-of-Students (DeepSpeed-MoE §5): a shallower student built from its PR-MoE teacher,
trained with loss = LM + aux + β·T²·KL(teacher ‖ student), and staged KD: the KD term is
switched off for good at a configured step or when the student's validation loss stops
improving (DeepSpeed leaves that to the user restarting the job).

    student = make_student(teacher, [0, 1, 2, 4, 5])     # teacher layers kept, in order
    loss = kd_loss(student_logits, teacher_logits, T, mask)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertswitch.errors import ConfigError
from expertswitch.models.causal_lm import CausalLM


def student_layers(num_layers: int, layers: list[int] | None, depth: int | None) -> list[int]:
    """The teacher layers the student keeps: `layers` as given, or `depth` evenly spread ones
    (the first and the last always among them)."""
    if layers is None:
        if depth is None or not 1 <= depth <= num_layers:
            raise ConfigError(f"kd.depth must be between 1 and the teacher's {num_layers} layers")
        if depth == 1:
            return [num_layers - 1]
        layers = [round(i * (num_layers - 1) / (depth - 1)) for i in range(depth)]
    increasing = sorted(set(layers)) == list(layers)
    if not layers or not increasing or not 0 <= layers[0] <= layers[-1] < num_layers:
        raise ConfigError(f"kd.student_layers {layers} must be increasing teacher layer "
                          f"indices in [0, {num_layers})")  # fmt: skip
    return list(layers)


def make_student(teacher: CausalLM, layers: list[int]) -> CausalLM:
    """A new model: the teacher's embedding, final norm and lm_head, and copies of its layers
    `layers` (MoE layers with their experts, gates and residual branches)."""
    cfg = teacher.hf_config
    if cfg is None:
        raise ConfigError("the teacher was built without its config.json; load it with "
                          "CausalLM.from_pretrained")  # fmt: skip
    cfg = dict(cfg)
    cfg["num_hidden_layers"] = len(layers)
    if cfg.get("moe_layers"):
        cfg["moe_layers"] = [cfg["moe_layers"][i] for i in layers]
        if not any(cfg["moe_layers"]):  # no MoE layer kept: a plain Llama
            cfg["model_type"] = "llama"
            cfg["architectures"] = ["LlamaForCausalLM"]
            cfg.pop("moe_layers")
    # per-layer attention kinds follow the kept layers (Qwen2's max_window_layers is a
    # threshold on the teacher's numbering: spelled out per layer instead)
    cfg.pop("max_window_layers", None)
    cfg.pop("layer_types", None)
    windows = [teacher.cfg.sliding_windows[i] for i in layers]
    if any(w is not None for w in windows):
        cfg["layer_types"] = ["sliding_attention" if w is not None else "full_attention"
                              for w in windows]  # fmt: skip
    student = CausalLM.from_config(cfg)
    with torch.no_grad():
        student.model.embed_tokens.load_state_dict(teacher.model.embed_tokens.state_dict())
        student.model.norm.load_state_dict(teacher.model.norm.state_dict())
        student.lm_head.load_state_dict(teacher.lm_head.state_dict())
        for mine, i in zip(student.model.layers, layers):
            mine.load_state_dict(copy.deepcopy(teacher.model.layers[i].state_dict()))
    return student


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """T²·KL(p_teacher ‖ p_student) at temperature T, averaged over positions: logits [..., V],
    mask [...] (True: counted)."""
    t = temperature
    log_s = F.log_softmax(student.float() / t, dim=-1)
    log_t = F.log_softmax(teacher.float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # [...]
    if mask is not None:
        kl = kl[mask]
    return kl.mean() * t * t


@dataclass
class KDState:
    """Staged KD's switch, saved in checkpoints (a resumed run keeps its decision)."""

    active: bool = True
    stopped_at: int | None = None
    reason: str = ""
    best_val: float = float("inf")
    bad_evals: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def kd_weight(state: KDState, beta: float) -> float:
    return beta if state.active else 0.0


def update_on_step(state: KDState, step: int, stop_step: int | None) -> str | None:
    """Called before each step; returns a message when KD switches off here."""
    if state.active and stop_step is not None and step >= stop_step:
        state.active, state.stopped_at, state.reason = False, step, f"stop_step {stop_step}"
        return f"KD switched off at step {step} (kd.stop_step)"
    return None


def update_on_eval(state: KDState, step: int, val: float, patience: int | None,
                   min_delta: float) -> str | None:  # fmt: skip
    """Called after each evaluation of the student; returns a message when KD switches off."""
    if val < state.best_val - min_delta:
        state.best_val, state.bad_evals = val, 0
        return None
    state.bad_evals += 1
    if state.active and patience is not None and state.bad_evals >= patience:
        state.active, state.stopped_at = False, step
        state.reason = f"validation plateau ({patience} evaluations without improvement)"
        return f"KD switched off at step {step}: {state.reason}"
    return None
