"""Files and folders the agent makes: their modes set outright, whatever the umask."""
from __future__ import annotations

import os
from pathlib import Path

DIR_MODE = 0o750


def make_dirs(folder: Path, mode: int = DIR_MODE) -> None:
    """mkdir -p with every new folder at `mode` (folders that exist are left alone): the umask
    of a debugging shell may be 0000, and a folder others can write lets them plant files."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for item in reversed(missing):
        try:
            item.mkdir(mode=mode)
        except FileExistsError:
            continue  # made meanwhile, by another thread or node
        os.chmod(item, mode)  # mkdir's mode is masked by the umask
