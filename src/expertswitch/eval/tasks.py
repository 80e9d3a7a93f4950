"""Domain tasks for the expert family, each scored on held-out data:

- code   next-line completion: 30 lines of a held-out standard-library file as context, greedy
         decoding of the next line, exact match (indentation included, trailing blanks not)
- math   held-out word problems (operand pairs never trained on), greedy answer, exact match
- prose  cloze: held-out documentation text up to a content word (≥ 4 letters), greedy
         decoding, the first word generated must be that word

Each task also gets a graded score, the teacher-forced top-1 accuracy on the answer's tokens
(a model too small to get whole answers right still shows how much closer it gets), and every
domain its held-out perplexity. Prompts end before the whitespace that precedes the answer:
byte-level BPE attaches a leading space or newline to the next token, so a prompt ending in
one would ask for a token split the model never saw. Items are chosen deterministically from the
held-out split, so two checkpoints are always scored on the same items.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass

import torch

from expertswitch.zoo.corpora import load_corpora, math_problems

_WORD = re.compile(r"[A-Za-z]{4,}")


@dataclass
class TaskItem:
    prompt: str
    answer: str


@dataclass
class DomainScore:
    domain: str
    task: str
    score: float  # exact match
    token_acc: float  # teacher-forced top-1 accuracy on the answer tokens
    n: int
    ppl: float

    def to_dict(self) -> dict:
        return asdict(self)


TASK_NAMES = {"code": "next-line EM", "math": "answer EM", "prose": "cloze word acc."}


def code_items(heldout: list[str], n: int, seed: int = 0) -> list[TaskItem]:
    rng = random.Random(f"code-items:{seed}")
    items = []
    for doc in heldout:
        lines = doc.split("\n")
        for i in range(30, len(lines)):
            line = lines[i]
            s = line.strip()
            if len(s) >= 8 and not s.startswith(("#", '"', "'")):
                items.append(TaskItem("\n".join(lines[i - 30 : i]), "\n" + line.rstrip()))
    rng.shuffle(items)
    return items[:n]


def prose_items(heldout: list[str], n: int, seed: int = 0) -> list[TaskItem]:
    rng = random.Random(f"prose-items:{seed}")
    items = []
    for doc in heldout:
        for m in _WORD.finditer(doc):
            if m.start() > 200 and doc[m.start() - 1] == " ":
                start = max(0, m.start() - 600)
                items.append(TaskItem(doc[start : m.start() - 1], " " + m.group()))
    rng.shuffle(items)
    return items[:n]


def math_items(n: int, seed: int = 0, unseen_template: bool = False) -> list[TaskItem]:
    # "A: " ends in a space: the answer keeps it (" 264"), as the training text tokenizes it
    problems = math_problems(n, True, seed, unseen_template)
    return [TaskItem(p.prompt.rstrip(" "), " " + p.answer) for p in problems]


def task_items(domain: str, corpora, n: int, seed: int = 0) -> list[TaskItem]:
    if domain == "code":
        return code_items(corpora["code"].heldout, n, seed)
    if domain == "math":
        return math_items(n, seed)
    if domain == "prose":
        return prose_items(corpora["prose"].heldout, n, seed)
    raise ValueError(f"unknown domain {domain!r}")


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
    """Exact match of the generated answer: the next line (code), the leading integer (math),
    the first word (prose)."""
    hits = 0
    for item, out in zip(items, completions):
        if domain == "code":
            hits += out.startswith("\n") and out[1:].split("\n")[0].rstrip() == item.answer[1:]
        else:
            m = re.match(r"\s*(-?\d+)" if domain == "math" else r"\s*([A-Za-z]+)", out)
            hits += bool(m) and m.group(1) == item.answer.strip()
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


_NEW_TOKENS = {"code": 32, "math": 6, "prose": 6}


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


def evaluate_model(model, tok, domains, corpora=None, n_items: int = 100, ppl_tokens: int = 8192,
                   seed: int = 0) -> dict[str, DomainScore]:  # fmt: skip
    """Task score and held-out perplexity per domain for a loaded model."""
    corpora = corpora or load_corpora(seed)
    out = {}
    for d in domains:
        items = task_items(d, corpora, n_items, seed)
        batch = 64 if model.device.type == "cuda" else 16  # fewer decode passes on a GPU
        completions = greedy(model, tok, [it.prompt for it in items], _NEW_TOKENS[d],
                             batch_size=batch)  # fmt: skip
        score = score_items(d, items, completions)
        acc = answer_token_accuracy(model, tok, items)
        ppl = perplexity(model, tok, corpora[d].heldout, ppl_tokens)
        out[d] = DomainScore(d, TASK_NAMES[d], round(score, 4), round(acc, 4), len(items),
                             round(ppl, 3))  # fmt: skip
    return out


def load_checkpoint(path, device: str = "cpu"):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tok


def evaluate_checkpoint(path, domains, corpora=None, n_items: int = 100, device: str = "cpu",
                        seed: int = 0) -> dict[str, DomainScore]:  # fmt: skip
    model, tok = load_checkpoint(path, device)
    return evaluate_model(model, tok, domains, corpora, n_items, seed=seed)
