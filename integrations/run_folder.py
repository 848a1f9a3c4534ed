"""A fine-pruning job's output folder: what state it is in, and how it changes without loss.

- ``status.json`` says whether the run there is ``running``, ``failed`` (with the error) or
  ``finished``; a folder left ``running`` by a killed process reads as interrupted. A rerun
  knows which it faces and offers ``--resume`` or ``--overwrite``.
- ``--overwrite`` moves the old run aside (``.<name>.replaced-<time>`` beside it) and deletes
  it only once the new run has finished; until then it is one rename away.
- Result files and folders are written whole or not at all (:func:`write_file`,
  :func:`prune_plugin.storage.write_folder`: written under a temporary name, then renamed).
- A checkpoint is *complete* once ``prune_plugin.complete.json`` is in it: the SHA-256 of
  every file, written after all of them. Resuming takes the newest checkpoint whose files
  all match it; a checkpoint a kill interrupted has no such file and is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from prune_plugin.errors import PruningError
from prune_plugin.storage import write_atomic

STATUS = "status.json"
COMPLETE = "prune_plugin.complete.json"
CHECKPOINTS = "checkpoints"
RESULTS = ("model", "metrics.json", "sparsity.json", "sparsity.png", "config.resolved.yaml")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunFolderError(PruningError, ValueError):
    """The output folder cannot take this run as asked; the message says what to do."""


def write_file(path: Path, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` whole or not at all."""
    if isinstance(data, str):
        data = data.encode()
    return write_atomic(path, lambda tmp: tmp.write_bytes(data))  # type: ignore[arg-type]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def mark_complete(checkpoint: Path) -> None:
    """Record the SHA-256 of every file of ``checkpoint``; written last, so its presence means
    the checkpoint is whole."""
    files = {str(p.relative_to(checkpoint)): _sha256(p) for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != COMPLETE}
    write_file(checkpoint / COMPLETE, json.dumps(files, indent=1))


def is_complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was marked complete and every file still matches its checksum."""
    try:
        files = json.loads((checkpoint / COMPLETE).read_text())
        return bool(files) and all(_sha256(checkpoint / name) == digest
                                   for name, digest in files.items())
    except (OSError, ValueError, AttributeError):
        return False


class RunFolder:
    """The output folder of one job."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / CHECKPOINTS

    def state(self) -> str | None:
        """None (no run here), ``finished``, ``failed`` or ``interrupted``."""
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output_dir {str(self.path)!r} is a file, not a folder. Fix: "
                                 "choose another output_dir.")
        if not self.path.is_dir():
            return None
        try:
            state = json.loads((self.path / STATUS).read_text())["state"]
        except FileNotFoundError:
            state = None
        except (OSError, ValueError, KeyError, TypeError):
            state = "failed"  # a damaged status: treat the run as unfinished
        if state == "running":
            return "interrupted"  # its process is gone: a kill, a crash, a lost machine
        if state in ("finished", "failed"):
            return state
        if (self.path / "metrics.json").is_file() and (self.path / "model").is_dir():
            return "finished"  # written before status files existed
        if any((self.path / name).exists() for name in (*RESULTS, CHECKPOINTS)):
            return "interrupted"
        return None

    def error(self) -> str | None:
        try:
            return json.loads((self.path / STATUS).read_text()).get("error")
        except (OSError, ValueError, AttributeError):
            return None

    def check(self, *, overwrite: bool, resume: bool) -> str | None:
        """Refuse what would lose work; returns the current state. Changes nothing."""
        state = self.state()
        if overwrite and resume:
            raise RunFolderError("--overwrite and --resume exclude each other. Fix: give one.")
        if state is None:
            if resume:
                raise RunFolderError(f"nothing to resume in {str(self.path)!r}: no run there. "
                                     "Fix: run without --resume.")
            return state
        if resume:
            if state == "finished":
                return state  # the caller says so and does nothing
            if self.newest_complete_checkpoint() is None:
                raise RunFolderError(
                    f"the {state} run in {str(self.path)!r} has no complete checkpoint to resume "
                    "from (it stopped before its first one). Fix: --overwrite to start again, "
                    "with training.save_steps to checkpoint along the way.")
            return state
        if overwrite:
            return state
        if state == "finished":
            raise RunFolderError(f"output folder {str(self.path)!r} already holds a finished run. "
                                 "Fix: choose another output_dir, or pass --overwrite to replace "
                                 "it (the old run is kept until the new one has finished).")
        why = self.error()
        has_checkpoint = self.newest_complete_checkpoint() is not None
        raise RunFolderError(
            f"output folder {str(self.path)!r} holds a {state} run"
            + (f" ({why})" if why else "") + ". Fix: "
            + ("--resume to continue it from its last complete checkpoint, or " if has_checkpoint
               else "")
            + "--overwrite to start again (the old run is kept until the new one has finished).")

    # -- changing it ---------------------------------------------------------------------------

    def set_state(self, state: str, error: str | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_file(self.path / STATUS, json.dumps({"state": state, "error": error,
                                                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def move_aside(self) -> Path:
        """Rename the folder to ``.<name>.replaced-<time>`` beside it; returns the new path."""
        aside = self.path.with_name(f".{self.path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
                                    f"-{os.getpid()}")
        os.replace(self.path, aside)
        return aside

    def replaced(self) -> list[Path]:
        return sorted(self.path.parent.glob(f".{self.path.name}.replaced-*"))

    def drop_replaced(self) -> None:
        """Delete the runs this one replaced (call once it has finished)."""
        for old in self.replaced():
            shutil.rmtree(old, ignore_errors=True)

    # -- checkpoints ----------------------------------------------------------------------------

    def _numbered_checkpoints(self) -> list[tuple[int, Path]]:
        if not self.checkpoints.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.checkpoints.iterdir()
                 if (m := _CHECKPOINT.match(p.name)) and p.is_dir()]
        return sorted(found, reverse=True)

    def newest_complete_checkpoint(self) -> Path | None:
        for _, path in self._numbered_checkpoints():
            if is_complete(path):
                return path
        return None

    def drop_incomplete_checkpoints(self) -> None:
        """Delete checkpoints a kill interrupted before they were marked complete (they can
        never be resumed from); damaged complete ones stay, for the user to look at."""
        for _, path in self._numbered_checkpoints():
            if not (path / COMPLETE).exists():
                shutil.rmtree(path, ignore_errors=True)
