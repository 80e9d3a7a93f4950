"""The engine on the built-in `tiny` family (real tokenizer, trained base and domain experts):
every expert served from its 2-bit archive answers with transformers' greedy tokens on the
checkpoint `reconstruct` rebuilds; text prompts, stop strings and `expertswitch generate`.

The family is stored in bf16. The engine (fp32) computes x·W_baseᵀ + x·Δ̂ᵀ; a reconstruction
in the experts' own bf16 rounds W_base + Δ̂ to 8 mantissa bits first, which moves logits by
~1e-2 and flips near-ties (measured: math expert on the code prompt, top-2 gap 1e-3). So the
reference is the reconstruction written in float32 (`reconstruct(..., dtype=torch.float32)`):
the same arithmetic without that storage rounding."""

import os
from pathlib import Path

import pytest
import torch
from test_engine import hf_greedy

from expertswitch.cli import main
from expertswitch.compress import CompressOptions, compress_expert, make_method, reconstruct
from expertswitch.compress.calibration import CalibOptions
from expertswitch.engine import Engine, SamplingParams
from expertswitch.zoo.build import build_family, family_dir

PROMPTS = {  # each expert's skill (held-out items) and, for the code one, raw code
    "code": ">>> sorted([6, 6, 9, 2, 5])",
    "math": "2 * 534 =",
    "prose": "In words, 275 is",
    "code-raw": "def fibonacci(n):\n    ",
}
N = 20


@pytest.fixture(scope="module")
def family(tmp_path_factory, request):
    """tiny (a few minutes on 2 cores: the family `expertswitch demo` built on its fresh
    cache, else built here), each expert compressed as the demo does."""
    root = tmp_path_factory.mktemp("tiny")
    if os.environ.get("EXPERTSWITCH_SKIP_SLOW") == "1":
        fam = build_family("tiny", root=root / "family", progress=False, log=lambda *_: None)
    else:
        proc, env = request.getfixturevalue("demo_run")
        assert proc.returncode == 0, proc.stderr[-2000:]
        cache = Path(env["EXPERTSWITCH_CACHE"])
        fam = build_family("tiny", root=family_dir("tiny", 0, cache),
                           log=lambda *_: pytest.fail("the demo's family was rebuilt"))  # fmt: skip
    opts = CompressOptions(calib=CalibOptions(tokens=2048, seq_len=128), progress=False,
                           quantize_embeddings=True)  # fmt: skip
    archives, recs = {}, {}
    for d in fam.domains:
        archives[d] = compress_expert(fam.base, fam.experts[d], root / f"{d}.delta",
                                      make_method("mixed", bits=2), opts)  # fmt: skip
        recs[d] = reconstruct(fam.base, archives[d], root / f"{d}.rec", progress=False,
                              dtype=torch.float32)  # fmt: skip
    return fam, archives, recs


def test_every_tiny_expert_equals_transformers_on_its_reconstruction(family):
    fam, archives, recs = family
    eng = Engine(fam.base, archives)
    texts = list(PROMPTS.values())
    combos = [(p, d) for p in texts for d in (*fam.domains, None)]  # one mixed batch of 16
    sp = SamplingParams(temperature=0.0, max_tokens=N)
    outs = eng.generate([p for p, _ in combos], [d for _, d in combos], sp)
    for (prompt, expert), out in zip(combos, outs):
        ids = eng.tokenizer.encode(prompt)
        assert out.prompt_token_ids == ids
        ref = hf_greedy(recs[expert] if expert else fam.base, ids, N)
        assert out.token_ids == ref, (expert, prompt)
        assert out.text == eng.tokenizer.decode(ref, skip_special_tokens=True)
    # the experts do answer differently from the base on their own domain
    by = {(p, d): o.token_ids for (p, d), o in zip(combos, outs)}
    assert all(by[(PROMPTS[d], d)] != by[(PROMPTS[d], None)] for d in fam.domains)


def test_stop_strings_cut_the_text(family):
    fam, archives, _ = family
    eng = Engine(fam.base, archives)
    full = eng.generate(PROMPTS["code"], "code", SamplingParams(temperature=0, max_tokens=N))[0]
    assert len(full.text) > 4
    stop = full.text[2:4]
    cut = eng.generate(PROMPTS["code"], "code",
                       SamplingParams(temperature=0, max_tokens=N, stop=[stop]))[0]  # fmt: skip
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full.text[: full.text.index(stop)]
    assert stop not in cut.text


def test_generate_command(family, capsys):
    fam, archives, _ = family
    argv = ["generate", "--base", str(fam.base), "--max-tokens", "8"]
    for d, a in archives.items():
        argv += ["--expert", f"{d}={a}"]
    rc = main(argv + ["--prompt", PROMPTS["math"], "--prompt", PROMPTS["code"],
                      "--use", "math", "--use", "code"])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0 and "[math]" in out and "[code]" in out
    assert main(argv + ["--prompt", "x", "--use", "nope"]) == 2
    assert "unknown expert 'nope'" in capsys.readouterr().err
    assert main(["generate", "--base", str(fam.base), "--expert", "oops", "--prompt", "x"]) == 2
    assert "NAME=ARCHIVE" in capsys.readouterr().err
