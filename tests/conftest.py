"""Tiny real Hugging Face checkpoints built in code: a base and a perturbed "fine-tune"."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter (numpy on the CPU). The variable
# must be set before any kernel is decorated, i.e. before expertswitch.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_LINEAR = re.compile(r"(q|k|v|o|gate|up|down)_proj\.weight$|\.w[123]\.weight$")


def tiny_config(arch: str = "llama", vocab: int = 256):
    from transformers import LlamaConfig, MistralConfig, MixtralConfig

    common = dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=64)
    if arch == "mixtral":
        return MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2)
    raise ValueError(arch)


def model_class(arch: str):
    from transformers import LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM

    classes = {"llama": LlamaForCausalLM, "mistral": MistralForCausalLM}
    return {**classes, "mixtral": MixtralForCausalLM}[arch]


def finetune_like(model, seed: int, scale: float = 0.05) -> None:
    """Perturb every linear weight the way fine-tuning does: a low-rank shift plus small dense
    noise, with a few input channels moved much more (the outliers salient channels catch)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() < 2 or "embed" in name or "lm_head" in name:
                continue
            *lead, n, k = p.shape
            std = p.float().std().item()
            u = torch.randn(*lead, n, 4, generator=g)
            v = torch.randn(*lead, 4, k, generator=g)
            d = (u @ v) / 2 + torch.randn(*lead, n, k, generator=g)
            d[..., torch.randperm(k, generator=g)[:2]] *= 8
            p += (scale * std * d / d.std()).to(p.dtype)


def save_pair(root: Path, arch: str = "llama", dtype=torch.float32, seed: int = 0, **kw):
    """Write base/ and expert/ under root; returns (base_dir, expert_dir)."""
    torch.manual_seed(seed)
    cls = model_class(arch)
    base = cls(tiny_config(arch)).to(dtype)
    base_dir, expert_dir = root / "base", root / "expert"
    base.save_pretrained(base_dir, **kw)
    finetune_like(base, seed + 1)
    base.save_pretrained(expert_dir, **kw)
    return base_dir, expert_dir


@pytest.fixture(scope="session")
def llama_pair(tmp_path_factory):
    return save_pair(tmp_path_factory.mktemp("llama"), "llama")


def logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="session")
def deepspeed():
    """The installed DeepSpeed as an oracle, on one CPU process (a gloo world of one); the
    tests that use it are skipped, saying why, where it is not installed."""
    ds = pytest.importorskip("deepspeed", reason="DeepSpeed is the oracle of these tests: "
                             "pip install deepspeed")  # fmt: skip
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0",
                          WORLD_SIZE="1", LOCAL_RANK="0")  # fmt: skip
        ds.init_distributed(dist_backend="gloo", verbose=False)
    return ds


_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT", "TORCHELASTIC_RUN_ID")  # fmt: skip


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`expertswitch demo`, the README's main command, as a user runs it first: on a fresh
    cache, where it builds the `tiny` family (a few minutes on 2 cores). Returns (completed
    process, its environment). The tests of the tiny family reuse the family it built, so the
    suite builds it once."""
    import subprocess
    import sys

    if os.environ.get("EXPERTSWITCH_SKIP_SLOW") == "1":
        pytest.skip("asked to skip (EXPERTSWITCH_SKIP_SLOW=1)")
    cache = tmp_path_factory.mktemp("demo-cache")
    env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    env["EXPERTSWITCH_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "-m", "expertswitch.cli", "demo"], env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    return proc, env


def make_adapter(base: Path, out: Path, seed: int, targets, r: int = 4, alpha: float = 8,
                 tweak=None, pre=None, save=None, **options) -> Path:  # fmt: skip
    """A LoRA adapter as PEFT saves one, with random A and B (PEFT's default B = 0 would make
    the adapter the base itself); `pre(model)` changes the model before PEFT wraps it (added
    tokens), `tweak(model)` the adapter before saving; `save`: save_pretrained's options."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if pre is not None:
        with torch.no_grad():
            pre(model)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     **options)  # fmt: skip
    model = get_peft_model(model, cfg)
    if tweak is not None:
        with torch.no_grad():
            tweak(model)
    model.save_pretrained(out, **(save or {}))
    return out


def peft_greedy(base: Path, adapter: Path | None, prompt: list[int], n: int,
                vocab: int | None = None) -> list[int]:  # fmt: skip
    """PEFT's own greedy tokens (the adapter unmerged over transformers' model; `vocab`: the
    base resized first, as for an adapter saved with added tokens)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if vocab is not None:
        model.resize_token_embeddings(vocab)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = model.eval().generate(input_ids=x, attention_mask=torch.ones_like(x),
                                    max_new_tokens=n, do_sample=False, pad_token_id=0)  # fmt: skip
    return out[0, len(prompt) :].tolist()
