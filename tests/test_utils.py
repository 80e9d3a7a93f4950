import pytest

from expertswitch.utils.fs import atomic_directory


def test_atomic_directory_replaces_on_success_and_keeps_old_on_failure(tmp_path):
    out = tmp_path / "out"
    with atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("one")
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError), atomic_directory(out) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "one"  # the old directory survived
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind
    with atomic_directory(out) as tmp:
        (tmp / "b.txt").write_text("three")
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]


def test_import_does_not_initialise_cuda():
    import subprocess
    import sys

    code = ("import torch, expertswitch, expertswitch.compress, expertswitch.moe, "
            "expertswitch.router; assert not torch.cuda.is_initialized()")  # fmt: skip
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
