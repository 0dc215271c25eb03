"""The search folder: one writer at a time, and files that are either read or named as damaged.

A search, a resume, a confirmation or a report written into the folder holds the folder's lock
(``flock`` on ``lock`` inside it) from its checks to its last write. The OS drops the lock when
its holder dies in any way (SIGKILL included), so a lock is never stale; the file only says who
held it last. A second writer is refused before Ray starts, naming the holder.

Every command reads the folder's own files (trials.json, search.json, search.yaml, optuna.db,
the trials' checkpoints) through here, so that a truncated or foreign file is one line naming
it and exit status 2, not a traceback. This module imports neither Ray nor MLflow.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Optional

from ltsearch.config import ConfigError

LOCK_FILE = "lock"


def damaged(path: Path, why: str) -> ConfigError:
    """The one message for a file of the folder that cannot be used."""
    return ConfigError("search_dir", f"{path} is damaged ({why}); restore it from a copy, or "
                                     "start the search again under another --name")


def read_json(path: Path, default: Any = None) -> Any:
    """A JSON file of the folder (``default`` if absent); a truncated or foreign one is refused
    naming it."""
    path = Path(path)
    if not path.is_file():
        return default
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError:
        raise damaged(path, "not text") from None
    except json.JSONDecodeError as e:
        raise damaged(path, f"not JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    except OSError as e:
        raise ConfigError("search_dir", f"{path} cannot be read: {e.strerror or e}") from None


def check_study(path: Path, name: str) -> None:
    """The folder's Optuna study opens and holds the search's study (Optuna would otherwise
    fail after Ray has started, or create an empty study in a foreign file)."""
    import optuna

    if not path.is_file():
        raise damaged(path, "missing: the search's Optuna study is gone")
    try:
        storage = optuna.storages.RDBStorage(f"sqlite:///{path}")
        storage.get_study_id_from_name(name)
    except KeyError:
        raise damaged(path, f"it holds no study named {name!r}") from None
    except Exception as e:  # sqlalchemy's: "file is not a database", a schema it cannot read
        text = str(e).strip().splitlines()
        raise damaged(path, f"not an Optuna study: {text[0][:160] if text else type(e).__name__}") from None


def check_checkpoint(folder: Path, files: tuple[str, ...]) -> None:
    """A trial checkpoint Tune would restore: each of ``files`` present; a ``.json`` one parses,
    a ``.pt`` one is an intact zip archive (what ``torch.save`` writes; CRCs checked)."""
    for name in files:
        path = Path(folder) / name
        if not path.is_file():
            raise damaged(Path(folder), f"a trial checkpoint without {name}")
        if name.endswith(".json"):
            read_json(path)
        elif name.endswith(".pt"):
            try:
                with zipfile.ZipFile(path) as z:
                    bad = z.testzip()
            except (zipfile.BadZipFile, OSError) as e:
                raise damaged(path, f"not a checkpoint: {e}") from None
            if bad is not None:
                raise damaged(path, f"not a checkpoint: {bad} fails its CRC")


class FolderLock:
    """The folder's writer lock; ``key`` is the flag or argument the refusal names."""

    def __init__(self, folder: Path, key: str = "search_dir"):
        self.folder = Path(folder)
        self.key = key
        self.fd: Optional[int] = None
        self.created: list[Path] = []  # folders made for the lock, deepest first: removed on a refusal

    @property
    def path(self) -> Path:
        return self.folder / LOCK_FILE

    def acquire(self) -> "FolderLock":
        self.created = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            self._undo()
            raise ConfigError(self.key, f"{self.folder} cannot be written: {e.strerror or e}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise ConfigError(self.key, f"{self.folder} is in use by another ltsearch ({holder}); "
                                        "wait for it to end, or stop it (Ctrl-C or kill -TERM "
                                        "PID) and run this again") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(["ltsearch", *sys.argv[1:]])[:500],
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}).encode())
        self.fd = fd
        return self

    def release(self, refused: bool = False) -> None:
        """Let the next writer in; ``refused``: the command wrote nothing, so a folder it
        created for the lock goes again."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if refused:
            self._undo()

    def _undo(self) -> None:
        if self.created and self.folder.is_dir():
            self.path.unlink(missing_ok=True)
        for folder in self.created:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        self.created = []

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _holder(fd: int) -> str:
    """Who holds the lock, in words, from what the holder wrote into the file."""
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not info.get("pid"):
        return "it is starting"
    return (f"pid {info['pid']} on {info.get('host', '?')} since {info.get('since', '?')}: "
            f"{info.get('command', '')}")

