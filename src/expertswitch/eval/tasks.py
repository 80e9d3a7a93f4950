"""Domain tasks for the expert family, each scored on held-out items of its skill
(zoo/corpora.py), answers checked exactly:

- code   what the Python REPL prints for `>>> sorted([3, 9, 1])`: the first line generated must
         be Python's own output
- math   `2 * 347 =`, `347 + 50 =`: the leading integer generated must be the result (operands
         never trained on)
- prose  `In words, 4347 is`: the words up to the first full stop must be `four thousand three
         hundred forty-seven`

Each task also gets a graded score, the teacher-forced top-1 accuracy on the answer's tokens,
and every domain its held-out perplexity on raw text. Prompts end before the whitespace that
precedes the answer: byte-level BPE attaches a leading space or newline to the next token, so a
prompt ending in one would ask for a token split the model never saw. Items are chosen
deterministically from the held-out split, so two checkpoints are always scored on the same
items.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from expertswitch.zoo.corpora import load_corpora, skill_items


@dataclass
class TaskItem:
    prompt: str
    answer: str


@dataclass
class DomainScore:
    domain: str
    task: str
    score: float  # exact match
    token_acc: float | None  # teacher-forced top-1 accuracy on the answer tokens
    n: int
    ppl: float

    def to_dict(self) -> dict:
        return asdict(self)


TASK_NAMES = {"code": "REPL output EM", "math": "arithmetic EM", "prose": "number in words EM"}


def task_items(domain: str, corpora=None, n: int = 300, seed: int = 0) -> list[TaskItem]:
    """n held-out items of the domain's skill (`corpora` is accepted for the callers that pass
    it; the items do not depend on it)."""
    return [TaskItem(it.prompt, it.answer) for it in skill_items(domain, n, True, seed)]


def math_items(n: int, seed: int = 0) -> list[TaskItem]:
    return task_items("math", None, n, seed)


def extract_answer(domain: str, completion: str) -> str | None:
    """The part of a completion that is scored: the first line after the prompt's line (code),
    the leading integer (math), the words before the first full stop or line end (prose)."""
    if domain == "code":
        if not completion.startswith("\n"):
            return None
        return completion[1:].split("\n")[0].rstrip()
    if domain == "math":
        m = re.match(r"\s*(-?\d+)", completion)
        return m.group(1) if m else None
    if domain == "prose":
        head = re.split(r"[.\n]", completion.lstrip(" "), maxsplit=1)[0].strip()
        return head or None
    raise ValueError(f"unknown domain {domain!r}")


def is_correct(domain: str, item: TaskItem, completion: str) -> bool:
    want = item.answer[1:] if domain == "code" else item.answer.strip().rstrip(".")
    return extract_answer(domain, completion) == want


@torch.inference_mode()
def greedy(model, tok, prompts: list[str], max_new_tokens: int, max_context: int = 384,
           batch_size: int = 16) -> list[str]:  # fmt: skip
    """Greedy continuations of `prompts` (left-padded batches, prompts cut to their last
    `max_context` tokens)."""
    device = next(model.parameters()).device
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    outs = []
    for i in range(0, len(prompts), batch_size):
        enc = [tok(p)["input_ids"][-max_context:] for p in prompts[i : i + batch_size]]
        width = max(map(len, enc))
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad,
                             eos_token_id=tok.eos_token_id)  # fmt: skip
        outs += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def score_items(domain: str, items: list[TaskItem], completions: list[str]) -> float:
    """Exact match of the generated answers (`is_correct`)."""
    hits = sum(is_correct(domain, it, out) for it, out in zip(items, completions))
    return hits / max(1, len(items))


@torch.inference_mode()
def answer_token_accuracy(model, tok, items: list[TaskItem], max_context: int = 384) -> float:
    """Mean over items of the teacher-forced top-1 accuracy on the answer's tokens."""
    device = next(model.parameters()).device
    accs = []
    for item in items:
        full_prompt = tok(item.prompt)["input_ids"]
        prompt = full_prompt[-max_context:]
        answer = tok(item.prompt + item.answer)["input_ids"][len(full_prompt) :]
        if not answer:
            continue
        ids = torch.tensor([prompt + answer], device=device)
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        accs.append((logits.argmax(-1).cpu() == torch.tensor(answer)).float().mean().item())
    return sum(accs) / max(1, len(accs))


# longest answers: code `[9, 9, 9, 9, 9, 9]`, math ` 1998`, prose ` seven thousand seven hundred
# seventy-seven.` (18 tokens with the tiny tokenizer): room for each, and a stop after it
_NEW_TOKENS = {"code": 24, "math": 8, "prose": 28}


@torch.inference_mode()
def perplexity(model, tok, texts: list[str], max_tokens: int = 8192, seq_len: int = 256) -> float:
    device = next(model.parameters()).device
    ids: list[int] = []
    for t in texts:
        ids += tok(t)["input_ids"] + [tok.eos_token_id]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    nll, count = 0.0, 0
    for i in range(0, len(ids) - 1, seq_len):
        window = torch.tensor([ids[i : i + seq_len + 1]], device=device)
        if window.shape[1] < 2:
            break
        out = model(input_ids=window[:, :-1])
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        nll -= logp.gather(-1, window[:, 1:, None]).sum().item()
        count += window.shape[1] - 1
    return math.exp(nll / max(1, count))


def answer_items(model, tok, domain: str, items: list[TaskItem]) -> list[str]:
    """Greedy completions of the items' prompts, long enough for the domain's answers."""
    return greedy(model, tok, [it.prompt for it in items], _NEW_TOKENS[domain], batch_size=100)


def evaluate_model(model, tok, domains, corpora=None, n_items: int = 300, ppl_tokens: int = 8192,
                   seed: int = 0, token_acc: bool = True) -> dict[str, DomainScore]:  # fmt: skip
    """Task score and held-out perplexity per domain for a loaded model."""
    corpora = corpora or load_corpora(seed)
    out = {}
    for d in domains:
        items = task_items(d, corpora, n_items, seed)
        score = score_items(d, items, answer_items(model, tok, d, items))
        acc = answer_token_accuracy(model, tok, items) if token_acc else None
        ppl = perplexity(model, tok, corpora[d].heldout, ppl_tokens)
        out[d] = DomainScore(d, TASK_NAMES[d], round(score, 4),
                             None if acc is None else round(acc, 4), len(items),
                             round(ppl, 3))  # fmt: skip
    return out


def load_checkpoint(path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tok


def evaluate_checkpoint(path, domains, corpora=None, n_items: int = 300, device: str = "cpu",
                        seed: int = 0,
                        token_acc: bool = True) -> dict[str, DomainScore]:  # fmt: skip
    model, tok = load_checkpoint(path, device)
    return evaluate_model(model, tok, domains, corpora, n_items, seed=seed, token_acc=token_acc)
