"""The router: a backbone embedding, a trained linear head over the expert names, and a
confidence fallback.

    router = Router.train(texts, labels, backbone="minilm")
    router.route(["def f(x): ...", [{"role": "user", "content": "What is 3 + 4?"}]])
    → [Route(expert="code", confidence=0.98, ...), Route(expert="math", ...)]

Below `threshold` (calibrated on held-out data to a target accuracy) a query goes to `default`
(the base model, "__base__", or a named generalist expert). A saved router is a directory:
`router.json` (format, expert names, backbone identity, threshold, default, training summary)
and `head.safetensors`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from expertswitch.errors import ConfigError
from expertswitch.router.backbones import make_backbone

FORMAT = "expertswitch-router"
FORMAT_VERSION = 1
BASE = "__base__"  # route to the base model itself (PEFT's name for "no adapter")


@dataclass
class Route:
    expert: str
    confidence: float
    probs: dict[str, float]
    fallback: bool = False
    reason: str = ""


def query_text(query) -> str:
    """Plain text, or chat messages ([{"role", "content"}]) → the text that is classified:
    the user turns, latest last (system prompts say little about the domain)."""
    if isinstance(query, str):
        return query
    if isinstance(query, dict):
        query = [query]
    if isinstance(query, list) and all(isinstance(m, dict) and "content" in m for m in query):
        users = [str(m["content"]) for m in query if m.get("role", "user") == "user"]
        return "\n".join(users or [str(m["content"]) for m in query])
    raise ConfigError(
        f"a query must be text or a list of chat messages, got {type(query).__name__}"
    )


def train_head(x: torch.Tensor, y: torch.Tensor, n_classes: int, epochs: int = 300,
               lr: float = 0.05, weight_decay: float = 1e-4,
               seed: int = 0) -> torch.nn.Linear:  # fmt: skip
    """Multinomial logistic regression on embeddings x [N, D], full-batch AdamW."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    # class-balanced loss: a domain with fewer examples is not drowned out
    counts = torch.bincount(y, minlength=n_classes).float().clamp_min(1)
    loss_fn = torch.nn.CrossEntropyLoss(weight=counts.sum() / (n_classes * counts))
    scale = 1.0 / x.std().clamp_min(1e-6)  # unit-scale features, so one lr suits all backbones
    for _ in range(epochs):
        opt.zero_grad()
        loss_fn(head(x * scale), y).backward()
        opt.step()
    with torch.no_grad():  # fold the feature scale into the weights
        head.weight.mul_(scale)
    return head.eval()


def calibrate_threshold(confidence: torch.Tensor, correct: torch.Tensor, target: float) -> float:
    """Smallest confidence threshold whose routed queries (confidence ≥ threshold) reach
    `target` accuracy on held-out data; 0 when all queries already do."""
    order = torch.argsort(confidence, descending=True)
    hits = correct[order].float().cumsum(0)
    acc = hits / torch.arange(1, len(order) + 1)
    # the largest prefix (most queries routed) whose accuracy meets the target, ending where the
    # confidence drops: routing is `confidence ≥ threshold`, so a prefix cut inside a run of
    # equal confidences would route the rest of the run too
    ranked = confidence[order]
    boundary = torch.ones_like(acc, dtype=torch.bool)
    boundary[:-1] = ranked[:-1] > ranked[1:]
    ok = ((acc >= target) & boundary).nonzero().flatten()
    if len(ok) == 0:
        return 1.0 + 1e-6  # nothing meets the target: everything falls back
    last = int(ok.max())
    return 0.0 if last == len(order) - 1 else float(confidence[order[last]])


class Router:
    def __init__(self, backbone, head: torch.nn.Linear, experts: list[str], threshold: float = 0.0,
                 default: str = BASE, info: dict | None = None):  # fmt: skip
        if len(set(experts)) != len(experts) or not experts:
            raise ConfigError(f"expert names must be unique and non-empty, got {experts}")
        self.backbone, self.head, self.experts = backbone, head, list(experts)
        self.threshold, self.default, self.info = threshold, default, info or {}

    @classmethod
    def train(cls, texts: list[str], labels: list[str], backbone="minilm", base_model=None,
              device: str = "cpu", default: str = BASE, epochs: int = 300) -> Router:  # fmt: skip
        if len(texts) != len(labels) or not texts:
            raise ConfigError("training needs the same, non-zero number of texts and labels")
        bb = make_backbone(backbone, base_model, device) if isinstance(backbone, str) else backbone
        experts = sorted(set(labels))
        if len(experts) < 2:
            raise ConfigError(f"routing needs at least two experts, the data names {experts}")
        x = embed_all(bb, texts)
        y = torch.tensor([experts.index(lbl) for lbl in labels])
        head = train_head(x, y, len(experts), epochs)
        acc = (head(x).argmax(-1) == y).float().mean().item()
        info = {"train_examples": len(texts), "train_accuracy": round(acc, 4),
                "per_expert": {e: labels.count(e) for e in experts}}  # fmt: skip
        return cls(bb, head, experts, 0.0, default, info)

    @torch.inference_mode()
    def probabilities(self, texts: list[str]) -> torch.Tensor:
        # float64: in float32 a confident head saturates to exactly 1.0, and a threshold cannot
        # separate a wrong route from the right ones tied with it
        return torch.softmax(self.head(embed_all(self.backbone, texts)).double(), dim=-1)

    def route(self, queries, batch_size: int = 64) -> list[Route]:
        """Route each query (text or chat messages). Empty queries go to the default."""
        texts = [query_text(q) for q in queries]
        live = [i for i, t in enumerate(texts) if t.strip()]
        routes: list[Route | None] = [None] * len(texts)
        for i in set(range(len(texts))) - set(live):
            routes[i] = Route(self.default, 0.0, {}, True, "empty query")
        live.sort(key=lambda i: len(texts[i]))  # similar lengths share a batch: less padding
        for start in range(0, len(live), batch_size):
            idx = live[start : start + batch_size]
            probs = self.probabilities([texts[i] for i in idx])
            for i, p in zip(idx, probs):
                conf, best = p.max(0)
                pmap = {e: round(float(v), 6) for e, v in zip(self.experts, p)}
                low = float(conf) < self.threshold
                routes[i] = Route(self.default if low else self.experts[int(best)], float(conf),
                                  pmap, low, "low confidence" if low else "")  # fmt: skip
        return routes  # type: ignore[return-value]

    def calibrate(self, texts: list[str], labels: list[str], target: float) -> float:
        """Set the fallback threshold so held-out accuracy of routed queries reaches `target`."""
        probs = self.probabilities(texts)
        conf, pred = probs.max(-1)
        truth = torch.tensor([self.experts.index(lbl) for lbl in labels])
        self.threshold = calibrate_threshold(conf, pred == truth, target)
        self.info["calibration"] = {"target_accuracy": target, "examples": len(texts),
                                    "threshold": self.threshold}  # fmt: skip
        return self.threshold

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {"weight": self.head.weight.detach().contiguous(),
                 "bias": self.head.bias.detach().contiguous()}  # fmt: skip
        save_file(state, str(path / "head.safetensors"))
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "experts": self.experts,
                "backbone": self.backbone.identity, "threshold": self.threshold,
                "default": self.default, "info": self.info}  # fmt: skip
        (path / "router.json").write_text(json.dumps(meta, indent=1) + "\n")
        return path


def embed_all(backbone, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    chunks = [backbone.embed(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    return torch.cat(chunks) if chunks else torch.zeros(0, getattr(backbone, "dim", 1))


def load_router(path: str | Path, experts: list[str] | None = None, base_model=None,
                device: str = "cpu", backbone=None) -> Router:  # fmt: skip
    """Load a saved router. `experts`: the expert set being served; a router trained for a
    different set is refused. `backbone` / `base_model`: must match the saved identity."""
    path = Path(path)
    mf = path / "router.json"
    if not mf.is_file():
        raise ConfigError(f"{path} is not a saved router (no router.json); train one with "
                          "`expertswitch router train`")  # fmt: skip
    meta = json.loads(mf.read_text())
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"{mf} is not a version-{FORMAT_VERSION} {FORMAT} file")
    if experts is not None and sorted(experts) != sorted(meta["experts"]):
        raise ConfigError(
            f"router {path} was trained for experts {meta['experts']} but {sorted(experts)} are "
            "being served; retrain it on data for these experts"
        )
    saved = meta["backbone"]
    bb = backbone or make_backbone(saved["backbone"], base_model, device)
    if bb.identity != saved:
        raise ConfigError(
            f"router {path} was trained on backbone {saved}, but the backbone given is "
            f"{bb.identity}; load it with the same backbone (for 'base': the same base model)"
        )
    state = load_file(str(path / "head.safetensors"))
    head = torch.nn.Linear(state["weight"].shape[1], state["weight"].shape[0])
    head.load_state_dict(state)
    return Router(bb, head.eval(), meta["experts"], meta["threshold"], meta["default"],
                  meta.get("info"))  # fmt: skip
