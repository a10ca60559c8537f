"""Files and folders the agent makes: their modes set outright, whatever the umask."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Tuple

DIR_MODE = 0o750


def make_dirs(folder: Path, mode: int = DIR_MODE,
              owner: Optional[Tuple[int, int]] = None) -> None:
    """mkdir -p with every new folder at `mode`, and given to `owner` (uid, gid) if set; folders
    that exist are left alone. The umask of a debugging shell may be 0000, and a folder others
    can write lets them plant files."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for item in reversed(missing):
        try:
            item.mkdir(mode=mode)
        except FileExistsError:
            continue  # made meanwhile, by another download thread or node
        os.chmod(item, mode)  # mkdir's mode is masked by the umask
        if owner:
            os.chown(item, *owner)
