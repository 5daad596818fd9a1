"""Compiling a native library once per content and sharing it safely between processes and environments.

A library lives in `<root>/<name>_<digest>/<name>.so`, the digest taken over what is compiled (the sources'
bytes, the flags, torch's and Python's versions), so:

- a library that is already there is loaded as it is, without asking torch's builder (which compares
  include paths and would rebuild for every virtual environment) and without writing anything: two
  environments with the same torch share one build, and a read-only folder works;
- a build runs in a private folder (torch's own build lock lives there) and only the finished library is
  renamed into place, so a build killed part-way leaves nothing another process waits on;
- builders of the same content take turns through an OS lock (`flock`), which the kernel releases when its
  holder dies, however it dies. A waiter says what it waits for and gives up after `wait` seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

BUILD_SECONDS = "~40 s on 2 cores"  # what the message promises; measured for linear.cpp + attention.cpp


def default_root() -> Path:
    """TORCH_EXTENSIONS_DIR, else torch's default extensions folder."""
    from torch.utils import cpp_extension

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())


def digest(sources: list[Path], cflags: list[str]) -> str:
    """16 hex digits naming what is compiled: the sources' names and bytes, the flags, torch and Python."""
    h = hashlib.sha256(" ".join([torch.__version__, platform.python_version(), *cflags]).encode())
    for source in sources:
        h.update(source.name.encode() + b"\0" + source.read_bytes())
    return h.hexdigest()[:16]


def library_path(name: str, sources: list[Path], cflags: list[str], root: Path) -> Path:
    return root / f"{name}_{digest(sources, cflags)}" / f"{name}.so"


def load(name: str, sources: list[Path], cflags: list[str], root: Path | None = None, wait: float | None = None,
         announce: str | None = None) -> Path:
    """Load library `name` compiled from `sources`, building it first if no process has; returns its path.

    wait: seconds to wait for another process building the same library (default STABLELM_BUILD_WAIT, else
    600), then TimeoutError. announce: the one stderr line printed when this process compiles."""
    root = Path(root) if root is not None else default_root()
    wait = float(os.environ.get("STABLELM_BUILD_WAIT", "600")) if wait is None else wait
    library = library_path(name, sources, cflags, root)
    if library.is_file():
        torch.ops.load_library(str(library))
        return library
    announce = announce or f"stablelm: building {name} for this CPU"
    try:
        library.parent.mkdir(parents=True, exist_ok=True)
        lock = open(library.parent.with_name(f".{library.parent.name}.lock"), "a+")
    except OSError as e:  # a read-only extensions folder: compile for this process alone
        print(f"{announce} (not cached: {root} is not writable: {e.strerror})", file=sys.stderr, flush=True)
        return _compile(name, sources, cflags, Path(tempfile.mkdtemp(prefix=f"{name}-")))
    with lock, _exclusive(lock, wait, library):
        if not library.is_file():  # the process we waited for may have built it
            for stale in root.glob(f".{library.parent.name}.building-*"):  # left by builds killed part-way
                shutil.rmtree(stale, ignore_errors=True)
            print(f"{announce}, once ({BUILD_SECONDS}), in {library.parent}", file=sys.stderr, flush=True)
            private = Path(tempfile.mkdtemp(prefix=f".{library.parent.name}.building-", dir=root))
            try:
                built = _compile(name, sources, cflags, private)
                os.replace(built, library)  # loaded from `built`: the mapping outlives the rename
            finally:
                shutil.rmtree(private, ignore_errors=True)
            return library
    torch.ops.load_library(str(library))
    return library


def _compile(name: str, sources: list[Path], cflags: list[str], folder: Path) -> Path:
    """Compile copies of `sources` in `folder` (a folder no other process uses) and load the result."""
    from torch.utils import cpp_extension

    copies = []
    for source in sources:
        copies.append(str(folder / source.name))
        shutil.copyfile(source, copies[-1])
    # No -march: each ISA level is compiled through a `target` attribute and picked at run time, so one
    # binary suits every x86-64 CPU and the cache needs no key per CPU.
    cpp_extension.load(name=name, sources=copies, build_directory=str(folder), is_python_module=False,
                       extra_cflags=cflags, verbose=False)
    return folder / f"{name}.so"


@contextmanager
def _exclusive(lock, wait: float, library: Path):
    """Hold `lock` (an open file) exclusively; say once what we wait for; TimeoutError after `wait` s."""
    deadline, said = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if library.is_file():  # finished while we polled: no need to hold the lock to load it
                yield
                return
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            if time.monotonic() > deadline:
                raise TimeoutError(f"{holder} has been building {library} for more than {wait:g} s (lock "
                                   f"{lock.name}; STABLELM_BUILD_WAIT sets the wait)") from None
            if not said:
                print(f"stablelm: waiting for {holder} to finish building {library.name} (lock {lock.name})",
                      file=sys.stderr, flush=True)
                said = True
            time.sleep(0.2)
    try:
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()} on {platform.node()}")
        lock.flush()
        yield
    finally:
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
