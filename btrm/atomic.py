"""Atomic, umask-respecting outputs: every file the project writes goes through `atomic_outputs`.

An output is written to a temporary file beside its destination and renamed over it only once
every output of the same call is complete, so a failure (an exception, a kill) never leaves a
half-written file nor destroys the previous version. Temporary files are created by `mkstemp`,
which always uses mode 0600; before the rename they get the mode a plain `open()` would have
given them (0666 minus the user's umask), so shared-cluster colleagues can read the results.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it; it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_outputs(paths: Sequence[str | os.PathLike]) -> Iterator[list[Path]]:
    """Yield one temporary path per destination; rename them all into place on success.

        with atomic_outputs([out_dir / "train.parquet", out_dir / "test.parquet"]) as (train_tmp, test_tmp):
            write(train_tmp); write(test_tmp)

    On an exception nothing is renamed and the temporary files are removed.
    """
    destinations = [Path(p) for p in paths]
    temps: list[Path] = []
    try:
        for destination in destinations:
            destination.parent.mkdir(parents=True, exist_ok=True)
            handle, temp = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
            os.close(handle)
            temps.append(Path(temp))
        yield list(temps)
        mode = 0o666 & ~current_umask()
        for temp in temps:
            os.chmod(temp, mode)
        for temp, destination in zip(temps, destinations, strict=True):
            os.replace(temp, destination)
    finally:
        for temp in temps:
            temp.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically, with the umask's mode."""
    with atomic_outputs([path]) as (temp,):
        temp.write_text(text, encoding="utf-8")
    return Path(path)
