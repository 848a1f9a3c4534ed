"""A fine-pruning job's output folder: what state it is in, and how it changes without loss.

- ``status.json`` is the job's own record: it says whether the run there is ``running``,
  ``interrupted`` (a signal stopped it), ``failed`` (with the error) or ``finished``; a folder
  left ``running`` by a killed process reads as interrupted. A rerun knows which it faces and
  offers ``--resume`` or ``--overwrite``.
- Only a folder with that record is a run folder. A folder with anything else in it is never
  an output (first run or ``--overwrite``), nor is a folder inside a run folder (its
  checkpoints, its model), through symlinks too: the job deletes only what it wrote.
- One job per folder: an exclusive lock (``fcntl``) on ``.<name>.lock`` beside the folder, held
  for the whole run; the kernel drops it when the process dies, so a stale lock is taken over.
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
from prune_plugin.storage import RUN_RECORD_NAME, holds_run_record, write_atomic

STATUS = RUN_RECORD_NAME
#: The record's marker: status.json files the job wrote say so.
RECORD_KIND = "prune-plugin fine-prune"
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
        """None (no run here: no folder, or an empty one), ``finished``, ``failed`` or
        ``interrupted``. Raises RunFolderError for a path that cannot be a run's output."""
        self._check_place()
        if not self.path.is_dir():
            return None
        if not holds_run_record(self.path):  # a status.json of another shape is not ours
            if any(self.path.iterdir()):
                shown = ", ".join(sorted(p.name for p in self.path.iterdir())[:5])
                raise RunFolderError(
                    f"output_dir {str(self.path)!r} is not empty ({shown}) and holds no run of "
                    "this job (no status.json record), so the job will not write into it, nor "
                    "replace it with --overwrite. Fix: choose a new or empty output_dir.")
            return None
        state = json.loads((self.path / STATUS).read_text())["state"]
        if state == "running":
            return "interrupted"  # its process is gone: a kill, a crash, a lost machine
        if state in ("finished", "failed", "interrupted"):
            return state
        return "failed"

    def _check_place(self) -> None:
        """The output must not be a file, under a file, nor inside another run folder (its
        checkpoints, its model), symlinks resolved."""
        if str(self.path) in ("", "."):
            raise RunFolderError("output_dir is empty: the run would be written into the "
                                 "current folder. Fix: name a new folder, e.g. "
                                 "output_dir: runs/sst2-movement.")
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"output_dir {str(self.path)!r} is a file, not a folder. Fix: "
                                 "choose another output_dir.")
        real = Path(os.path.realpath(self.path))
        for parent in real.parents:
            if parent.exists() and not parent.is_dir():
                raise RunFolderError(f"output_dir {str(self.path)!r} is under {str(parent)!r}, "
                                     "which is a file. Fix: choose another output_dir.")
            if holds_run_record(parent):
                raise RunFolderError(
                    f"output_dir {str(self.path)!r} is inside the run folder {str(parent)!r}"
                    + (f" (through a symlink: {str(real)!r})" if real != self.path.absolute()
                       else "") + ", whose files belong to that run. Fix: choose a folder "
                    "outside any run's output.")
        if self.path.is_symlink() and holds_run_record(real) and real != self.path.absolute():
            raise RunFolderError(f"output_dir {str(self.path)!r} is a symlink to the run folder "
                                 f"{str(real)!r}. Fix: use that path itself, or another folder.")

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
            f"output folder {str(self.path)!r} holds {'an' if state[0] in 'aeiou' else 'a'} "
            f"{state} run"
            + (f" ({why})" if why else "") + ". Fix: "
            + ("--resume to continue it from its last complete checkpoint, or " if has_checkpoint
               else "")
            + "--overwrite to start again (the old run is kept until the new one has finished).")

    # -- changing it ---------------------------------------------------------------------------

    def set_state(self, state: str, error: str | None = None) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        write_file(self.path / STATUS, json.dumps({
            "kind": RECORD_KIND, "state": state, "error": error, "pid": os.getpid(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}))

    def lock(self) -> RunLock:
        """The folder's exclusive lock, for the whole run (a context manager)."""
        return RunLock(self.path.with_name(f".{self.path.name}.lock"), self.path)

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


class RunLock:
    """An exclusive ``fcntl`` lock on a file beside the run folder (it survives the folder's
    move aside). The kernel releases it when its process dies: a stale lock file is simply
    locked again. Refused at once, naming the holder, while another job holds it."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path, self.folder = path, folder
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(
                f"another job is running into {str(self.folder)!r} ({holder}). Fix: wait for "
                "it to end, or choose another output_dir.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the lock; the file stays (removing it would race)
            self._fd = None
