"""Checkpoints whose loading would run code: what a malicious file does, harmlessly (it writes a marker)."""

from __future__ import annotations

from pathlib import Path

import torch


class WritesMarker:
    """Unpickling this writes a file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def code_running_fair_esm_pt(path: Path, marker: Path) -> Path:
    """A fair-esm-shaped `.pt` whose settings, unpickled unguarded, write `marker`."""
    torch.save({"cfg": {"model": WritesMarker(marker)}, "model": {}}, path)
    return path
