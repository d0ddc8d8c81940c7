"""Files written atomically get the permissions a plain ``open()`` would give them, not mkstemp's 0600."""

from __future__ import annotations

import os
import stat
import threading

import pytest

from yoloprune import atomic
from yoloprune.atomic import atomic_file, atomic_path, current_umask, write_bytes, write_text


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """``umask(mask)`` sets the process's umask for the test; the old one is restored after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_a_new_file_follows_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    expected = 0o666 & ~mask
    assert _mode(write_text(tmp_path / "report.md", "# report")) == expected
    assert _mode(write_bytes(tmp_path / "model.onnx", b"onnx")) == expected
    with atomic_file(tmp_path / "card.json", "w") as f:
        f.write("{}")
    assert _mode(tmp_path / "card.json") == expected
    with atomic_path(tmp_path / "results.csv") as tmp:  # a writer that takes a file name, and replaces the file
        tmp.unlink()
        tmp.write_text("a,b\n")
    assert _mode(tmp_path / "results.csv") == expected
    with open(tmp_path / "plain.txt", "w") as f:  # what the atomic writers match
        f.write("x")
    assert _mode(tmp_path / "plain.txt") == expected


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask):
    umask(0o022)
    card = write_text(tmp_path / "card.json", "{}")
    card.chmod(0o600)
    assert _mode(write_text(card, '{"v": 2}')) == 0o600 and card.read_text() == '{"v": 2}'
    card.chmod(0o444)  # read-only: the writer still fills its temporary file, the result stays read-only
    assert _mode(write_text(card, '{"v": 3}')) == 0o444 and card.read_text() == '{"v": 3}'


def test_the_umask_is_read_without_changing_it_under_other_threads(monkeypatch, umask):
    """Where /proc cannot tell it, the umask is set and restored under a lock; either way it ends unchanged."""
    umask(0o027)
    monkeypatch.setattr(atomic, "Path", lambda *_: (_ for _ in ()).throw(OSError("no /proc")))
    masks: list[int] = []
    threads = [threading.Thread(target=lambda: masks.append(current_umask())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert masks == [0o027] * 8 and os.umask(0o027) == 0o027
