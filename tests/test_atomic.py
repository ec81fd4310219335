"""btrm.atomic: outputs replaced all at once or not at all, with the mode a plain open() would give."""

import os

import pytest

from btrm import atomic


@pytest.fixture
def umask():
    """Set the process umask for one test; the previous one is put back afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)
    yield lambda mask: os.umask(mask)
    os.umask(previous)


def test_a_failed_second_write_keeps_every_old_output_byte_identical_and_leaves_no_temp_files(tmp_path):
    first, second = tmp_path / "train.parquet", tmp_path / "test.parquet"
    first.write_bytes(b"old train")
    second.write_bytes(b"old test")
    with pytest.raises(OSError, match="disk full"), atomic.atomic_outputs([first, second]) as (first_temp, second_temp):
        first_temp.write_bytes(b"new train, complete")
        second_temp.write_bytes(b"new te")  # half written, then the failure
        raise OSError("disk full")
    assert first.read_bytes() == b"old train" and second.read_bytes() == b"old test"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.parquet", "train.parquet"]


def test_a_complete_write_replaces_every_output(tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "sub" / "b.txt"
    first.write_text("old")
    with atomic.atomic_outputs([first, second]) as (first_temp, second_temp):
        first_temp.write_text("new a")
        second_temp.write_text("new b")
        assert first.read_text() == "old"  # nothing is visible before the block completes
    assert first.read_text() == "new a" and second.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.txt", "b.txt", "sub"]


@pytest.mark.parametrize("mask, expected_mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_get_the_mode_a_plain_open_would_give(tmp_path, umask, mask, expected_mode):
    umask(mask)
    written = atomic.atomic_write_text(tmp_path / "scores.jsonl", "x\n")
    with open(tmp_path / "plain.txt", "w") as plain:  # the reference: what open() itself does under this umask
        plain.write("x\n")
    assert written.stat().st_mode & 0o777 == expected_mode == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert atomic.current_umask() == mask  # reading the umask leaves it unchanged
