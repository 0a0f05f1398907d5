"""Session files on disk.

Layout of the store folder (default ~/exllama_sessions):

    <id>.json          one session; <id> = uuid4().hex, made here and checked by a strict regex
    <id>.json.bak      the previous version of that session (always one that loaded)
    <id>.json.corrupt-<time>   a corrupt main file set aside by recover()
    trash/<id>.json    deleted sessions (with their .bak), until restore() or purge()
    _state.json        {"schema": 1, "last_session": id}: the session to resume at start

Every write goes to a temp file in the same folder, is flushed and fsynced, the previous version is
hard-linked (or copied) to .bak, the temp file is os.replace'd onto the target and the folder fsynced.
A file that does not load is reported, never overwritten: save() refuses it until recover() restores
the backup explicitly. save() checks the revision on disk under a lock shared by every store on the
same folder in this process, so a stale client gets StaleRevisionError instead of wiping newer work.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import (CorruptSessionError, SessionError, SessionExistsError,
                     SessionFormatError, SessionNotFoundError, SessionTooLargeError, StaleRevisionError)
from .schema import SCHEMA_VERSION, Session
from .util import (clean_name, dumps_pretty, is_session_id, loads_strict, new_id, now,
                   validate_session_id)

DEFAULT_ROOT = "~/exllama_sessions"
MAX_IMPORT_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 256 * 1024 * 1024
STATE_FILE = "_state.json"
TRASH_DIR = "trash"
_SESSION_FILE_RE = re.compile(r"([0-9a-f]{32})\.json")
_TEMP_FILE_RE = re.compile(r"\..+\.[0-9a-f]{16}\.tmp")
_STALE_TEMP_SECONDS = 600

_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def _lock_for(root: Path) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault(str(root), threading.RLock())


# ---- atomic file writing -------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # e.g. Windows: directories cannot be opened
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_path(target: Path) -> Path:
    return target.parent / f".{target.name}.{secrets.token_hex(8)}.tmp"


def _write_temp(target: Path, data: bytes) -> Path:
    tmp = _temp_path(target)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quiet(tmp)
        raise
    return tmp


def _unlink_quiet(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _backup(path: Path, bak: Path) -> None:
    """Make `bak` a copy of the current `path` (hard link when possible), atomically."""
    tmp = _temp_path(bak)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            shutil.copyfile(path, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, bak)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def atomic_write(path: Path, data: bytes, backup: Path | None = None) -> None:
    """Write `data` to `path` so that after a crash the file holds either the old or the new bytes.
    With `backup`, the old version (if any) is kept there."""
    tmp = _write_temp(path, data)
    try:
        if backup is not None and path.exists():
            _backup(path, backup)
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise
    _fsync_dir(path.parent)


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_ino, st.st_dev, st.st_size, st.st_mtime_ns)


# ---- listing -------------------------------------------------------------------------------------

@dataclass
class SessionInfo:
    """One row of the session list. For an unloadable file `error` says why (name/updated/count are
    then file-based placeholders) and `recoverable` tells whether its .bak loads."""
    id: str
    name: str
    updated: float
    created: float | None = None
    message_count: int = 0
    revision: int | None = None
    error: str | None = None
    recoverable: bool = False
    deleted: float | None = None  # trash entries: when the session was deleted

    def to_dict(self) -> dict:
        return asdict(self)


# ---- the store -----------------------------------------------------------------------------------

class SessionStore:
    """JSON session files in one folder. Thread-safe; all operations take a per-folder lock."""

    def __init__(self, root: str | os.PathLike = DEFAULT_ROOT, *, max_import_bytes: int = MAX_IMPORT_BYTES):
        root = Path(os.path.expanduser(os.fspath(root)))
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root = root.resolve()
        self.trash_dir = self.root / TRASH_DIR
        self.max_import_bytes = max_import_bytes
        self._lock = _lock_for(self.root)
        self._rev_cache: dict[str, tuple[tuple, int]] = {}   # id -> (stat key, revision) of a good file
        self._info_cache: dict[Path, tuple[tuple, SessionInfo]] = {}
        self._remove_stale_temp_files()

    # ---- paths ---------------------------------------------------------------------------------

    def _path(self, session_id: str, folder: Path | None = None) -> Path:
        sid = validate_session_id(session_id)
        base = folder or self.root
        p = base / f"{sid}.json"
        if p.parent != base:  # cannot happen after the regex; belt and braces
            raise SessionError("session path escapes the store folder")
        return p

    def path(self, session_id: str) -> Path:
        """The file of a session (validated id)."""
        return self._path(session_id)

    @staticmethod
    def _bak(path: Path) -> Path:
        return path.with_name(path.name + ".bak")

    def _remove_stale_temp_files(self) -> None:
        cutoff = time.time() - _STALE_TEMP_SECONDS
        for folder in (self.root, self.trash_dir):
            try:
                entries = list(os.scandir(folder))
            except OSError:
                continue
            for e in entries:
                try:
                    if (_TEMP_FILE_RE.fullmatch(e.name) and e.is_file(follow_symlinks=False)
                            and e.stat(follow_symlinks=False).st_mtime < cutoff):
                        os.unlink(e.path)
                except OSError:
                    pass

    # ---- reading -------------------------------------------------------------------------------

    def _read_file(self, path: Path, expect_id: str | None) -> tuple[Session, tuple]:
        """Load and validate one file. Raises SessionNotFoundError or CorruptSessionError."""
        flags = os.O_RDONLY | getattr(os, "O_BINARY", 0) | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            raise SessionNotFoundError(f"no session file {path.name}") from None
        except OSError as e:
            raise CorruptSessionError(path, f"cannot be opened: {e.strerror}") from None
        try:
            with os.fdopen(fd, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_size > MAX_FILE_BYTES:
                    raise CorruptSessionError(path, f"larger than {MAX_FILE_BYTES} bytes")
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise CorruptSessionError(path, f"cannot be read: {e.strerror}") from None
        try:
            session = Session.from_dict(loads_strict(data))
        except SessionFormatError as e:
            raise CorruptSessionError(path, str(e)) from e
        if expect_id is not None and session.id != expect_id:
            raise CorruptSessionError(path, f"its id {session.id} does not match the file name")
        return session, _stat_key(st)

    def _backup_loads(self, path: Path) -> bool:
        try:
            self._read_file(self._bak(path), path.name[:-5])
            return True
        except SessionError:
            return False

    def _load(self, session_id: str) -> Session:
        path = self._path(session_id)
        try:
            session, key = self._read_file(path, session_id)
        except CorruptSessionError as e:
            raise CorruptSessionError(e.path, e.reason, self._backup_loads(path)) from e.__cause__
        self._rev_cache[session_id] = (key, session.revision)
        return session

    def load(self, session_id: str) -> Session:
        """Load a session. SessionNotFoundError, or CorruptSessionError naming the file (left untouched)."""
        with self._lock:
            return self._load(session_id)

    def exists(self, session_id: str) -> bool:
        return self._path(session_id).is_file()

    def _current_revision(self, session_id: str) -> int:
        path = self._path(session_id)
        try:
            key = _stat_key(os.stat(path))
        except FileNotFoundError:
            raise SessionNotFoundError(f"no session {session_id}") from None
        cached = self._rev_cache.get(session_id)
        if cached is not None and cached[0] == key:
            return cached[1]
        return self._load(session_id).revision

    # ---- writing -------------------------------------------------------------------------------

    def _encode(self, session: Session) -> tuple[Session, bytes]:
        """Validate (and normalise) a session; return the validated copy and its bytes."""
        valid = Session.from_dict(session.to_dict())
        return valid, dumps_pretty(valid.to_dict())

    def _write(self, path: Path, data: bytes, session_id: str, revision: int, backup: bool) -> None:
        atomic_write(path, data, self._bak(path) if backup else None)
        try:
            self._rev_cache[session_id] = (_stat_key(os.stat(path)), revision)
        except OSError:
            self._rev_cache.pop(session_id, None)

    def save(self, session: Session, expected_revision: int | None = None) -> int:
        """Store `session` if the file on disk still has `expected_revision` (default: the session's own
        `revision`, i.e. the one it was loaded or last saved at). Returns the new revision, which is also
        set on `session` together with `updated`. Raises StaleRevisionError, SessionNotFoundError (use
        create/import for new sessions), CorruptSessionError (the file on disk does not load: recover()
        first) or SessionFormatError (the session is invalid; nothing written)."""
        if expected_revision is None:
            expected_revision = session.revision
        if isinstance(expected_revision, bool) or not isinstance(expected_revision, int):
            raise TypeError("expected_revision must be an int")
        with self._lock:
            sid = validate_session_id(session.id)
            current = self._current_revision(sid)
            if current != expected_revision:
                raise StaleRevisionError(sid, expected_revision, current)
            d = session.to_dict()
            d["revision"] = current + 1
            d["updated"] = max(now(), session.updated)
            valid = Session.from_dict(d)
            data = dumps_pretty(valid.to_dict())
            self._write(self._path(sid), data, sid, valid.revision, backup=True)
            session.revision, session.updated = valid.revision, valid.updated
            return valid.revision

    def _insert(self, session: Session) -> Session:
        """Write a new session under a fresh id (revision 1)."""
        with self._lock:
            for _ in range(5):
                session.id = new_id()
                path = self._path(session.id)
                if not path.exists() and not self._path(session.id, self.trash_dir).exists():
                    break
            else:
                raise SessionExistsError("could not find a free session id")
            session.revision = 1
            session.updated = now()
            valid, data = self._encode(session)
            self._write(path, data, valid.id, 1, backup=False)
            return valid

    def create(self, name: str | None = None, **fields) -> Session:
        """Create and store a new session (default participants "User" and "Chatbort")."""
        return self._insert(Session.new(name, **fields))

    def rename(self, session_id: str, name: str, expected_revision: int | None = None) -> Session:
        """Set the display name (cleaned; InvalidNameError if empty). Returns the saved session."""
        name = clean_name(name)
        with self._lock:
            s = self._load(session_id)
            s.name = name
            self.save(s, s.revision if expected_revision is None else expected_revision)
            return s

    def duplicate(self, session_id: str, name: str | None = None, upto: str | None = None) -> Session:
        """Copy a session under a new id. With `upto` (a message id), only the branch from the root to
        that message is copied ("branch to new session")."""
        with self._lock:
            s = self._load(session_id)
        if upto is not None:
            keep = {m.id for m in s.path_to(upto)}
            for mid in list(s.messages):
                if mid not in keep:
                    del s.messages[mid]
            for m in s.messages.values():
                m.children = [c for c in m.children if c in keep]
                m.last_child = m.children[0] if m.children else None
            s.active_leaf = upto
        s.name = clean_name(name) if name is not None else clean_name(s.name + " (copy)")
        s.created = now()
        return self._insert(s)

    # ---- listing -------------------------------------------------------------------------------

    def _info(self, path: Path, session_id: str) -> SessionInfo:
        try:
            st = os.stat(path)
        except OSError:
            raise SessionNotFoundError(session_id) from None
        key = _stat_key(st)
        cached = self._info_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            s, _ = self._read_file(path, session_id)
            info = SessionInfo(id=s.id, name=s.name, updated=s.updated, created=s.created,
                               message_count=len(s.messages), revision=s.revision)
        except SessionNotFoundError:
            raise
        except CorruptSessionError as e:
            info = SessionInfo(id=session_id, name=f"(unreadable) {path.name}", updated=st.st_mtime,
                               error=str(e), recoverable=self._backup_loads(path))
        if path.parent == self.trash_dir:
            info.deleted = st.st_mtime
        self._info_cache[path] = (key, info)
        return info

    def _list_folder(self, folder: Path) -> list[SessionInfo]:
        try:
            names = sorted(e.name for e in os.scandir(folder) if e.is_file(follow_symlinks=False))
        except FileNotFoundError:
            return []
        out = []
        for n in names:
            m = _SESSION_FILE_RE.fullmatch(n)
            if m is None:
                continue
            try:
                out.append(self._info(folder / n, m.group(1)))
            except SessionNotFoundError:
                continue  # vanished meanwhile
        out.sort(key=lambda i: (i.deleted or i.updated, i.id), reverse=True)
        return out

    def list(self) -> list[SessionInfo]:
        """All sessions, most recently updated first; unloadable ones carry `error`."""
        with self._lock:
            return self._list_folder(self.root)

    def list_trash(self) -> list[SessionInfo]:
        """Deleted sessions, most recently deleted first (`updated` is the deletion time here)."""
        with self._lock:
            return self._list_folder(self.trash_dir)

    # ---- delete / trash ------------------------------------------------------------------------

    def _move(self, src: Path, dst: Path) -> None:
        os.replace(src, dst)
        bak_src, bak_dst = self._bak(src), self._bak(dst)
        if bak_src.exists():
            os.replace(bak_src, bak_dst)
        elif bak_dst.exists():  # a stale backup must not pose as this file's backup
            os.unlink(bak_dst)

    def delete(self, session_id: str) -> None:
        """Move a session (even an unloadable one, bytes untouched) and its backup into trash/."""
        with self._lock:
            src = self._path(session_id)
            dst = self._path(session_id, self.trash_dir)
            if not src.is_file():
                raise SessionNotFoundError(f"no session {session_id}")
            if dst.exists():
                raise SessionExistsError(f"trash already holds a session {session_id}")
            self.trash_dir.mkdir(mode=0o700, exist_ok=True)
            self._move(src, dst)
            t = time.time()
            os.utime(dst, (t, t))  # the trash lists by deletion time
            _fsync_dir(self.trash_dir)
            _fsync_dir(self.root)
            self._rev_cache.pop(session_id, None)

    def restore(self, session_id: str) -> SessionInfo:
        """Bring a session back from trash/. SessionExistsError if a live session has the same id."""
        with self._lock:
            src = self._path(session_id, self.trash_dir)
            dst = self._path(session_id)
            if not src.is_file():
                raise SessionNotFoundError(f"no session {session_id} in the trash")
            if dst.exists():
                raise SessionExistsError(f"a session {session_id} already exists")
            self._move(src, dst)
            _fsync_dir(self.root)
            _fsync_dir(self.trash_dir)
            return self._info(dst, session_id)

    def purge(self, session_id: str) -> None:
        """Delete a trashed session for good."""
        with self._lock:
            p = self._path(session_id, self.trash_dir)
            if not p.is_file():
                raise SessionNotFoundError(f"no session {session_id} in the trash")
            os.unlink(p)
            _unlink_quiet(self._bak(p))
            _fsync_dir(self.trash_dir)

    def empty_trash(self) -> int:
        """Purge every trashed session; returns how many."""
        with self._lock:
            n = 0
            for info in self._list_folder(self.trash_dir):
                self.purge(info.id)
                n += 1
            return n

    # ---- recovery ------------------------------------------------------------------------------

    def recover(self, session_id: str) -> Session:
        """Explicitly restore a session whose main file is corrupt (or missing) from its .bak. The corrupt
        file is kept beside it as <id>.json.corrupt-<time>. The restored session gets the backup's
        revision + 1. SessionError if the main file loads fine; CorruptSessionError if the backup
        does not load either."""
        with self._lock:
            path = self._path(session_id)
            bak = self._bak(path)
            if path.exists():
                try:
                    self._read_file(path, session_id)
                except CorruptSessionError:
                    pass
                else:
                    raise SessionError(f"session {session_id} loads fine; nothing to recover")
            if not bak.exists():
                raise SessionNotFoundError(f"session {session_id} has no backup to recover from")
            s, _ = self._read_file(bak, session_id)
            if path.exists():
                stamp = time.strftime("%Y%m%dT%H%M%S")
                aside = path.with_name(f"{path.name}.corrupt-{stamp}-{secrets.token_hex(2)}")
                os.replace(path, aside)
            s.revision += 1
            s.updated = now()
            valid, data = self._encode(s)
            self._write(path, data, session_id, valid.revision, backup=False)
            self._info_cache.pop(path, None)
            return valid

    # ---- export / import -----------------------------------------------------------------------

    def export(self, session_id: str) -> bytes:
        """The session as pretty UTF-8 JSON (same schema as the file)."""
        return self.load(session_id).to_json()

    def import_session(self, data: bytes | str, name: str | None = None) -> Session:
        """Validate an exported session and store it under a new id (revision 1). Raises
        SessionTooLargeError over `max_import_bytes`, SessionFormatError for anything invalid."""
        if isinstance(data, str):
            if len(data) > self.max_import_bytes:  # every character takes at least one byte
                raise SessionTooLargeError(f"import is larger than {self.max_import_bytes} bytes")
            data = data.encode("utf-8", "surrogatepass")
        if not isinstance(data, (bytes, bytearray)):
            raise SessionFormatError(f"import must be bytes or str, not {type(data).__name__}")
        if len(data) > self.max_import_bytes:
            raise SessionTooLargeError(f"import is larger than {self.max_import_bytes} bytes")
        d = loads_strict(data)
        if isinstance(d, dict) and "id" in d:
            d = dict(d, id=new_id())  # the id is ours to choose; whatever came is ignored
        s = Session.from_dict(d)
        if name is not None:
            s.name = clean_name(name)
        return self._insert(s)

    # ---- last session --------------------------------------------------------------------------

    def set_last_session(self, session_id: str | None) -> None:
        """Remember the open session (written atomically to _state.json)."""
        if session_id is not None:
            validate_session_id(session_id)
        with self._lock:
            atomic_write(self.root / STATE_FILE,
                         dumps_pretty({"schema": SCHEMA_VERSION, "last_session": session_id}))

    def last_session_id(self) -> str | None:
        """The remembered session if it still loads, else the most recently updated loadable one, else
        None. A corrupt or foreign _state.json is ignored."""
        with self._lock:
            try:
                with open(self.root / STATE_FILE, "rb") as f:
                    state = loads_strict(f.read(65536))
                sid = state.get("last_session") if isinstance(state, dict) else None
                if is_session_id(sid):
                    self._load(sid)
                    return sid
            except (OSError, SessionError):
                pass
            return next((i.id for i in self._list_folder(self.root) if i.error is None), None)

    def resume(self) -> Session:
        """The session to open at start: last_session_id(), or a new one when none loads."""
        with self._lock:
            sid = self.last_session_id()
            s = self._load(sid) if sid is not None else self.create()
            if sid is None:
                self.set_last_session(s.id)
            return s
