"""stablelm.kernels.build: a library built once per content, shared safely between processes.

Each test compiles a one-function C++ file (seconds, not the kernels' ~40 s) through the same code path."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stablelm.kernels import build

LOADER = """
import ctypes, sys
from pathlib import Path
from stablelm.kernels import build
path = build.load("probe_lib", [Path(sys.argv[2])], ["-O1"], root=Path(sys.argv[1]), wait=float(sys.argv[3]))
print("value", ctypes.CDLL(str(path)).stablelm_probe(), flush=True)
"""


@pytest.fixture
def probe(tmp_path):
    source = tmp_path / "probe.cpp"
    source.write_text('extern "C" int stablelm_probe(void) { return 42; }\n')
    return source


def start(root, source, wait=60.0, env=None, stderr=None):
    return subprocess.Popen([sys.executable, "-c", LOADER, str(root), str(source), str(wait)],
                            stdout=subprocess.PIPE, stderr=stderr or subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def wait_for(path: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in (path.read_text() if path.exists() else ""):
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path}: {path.read_text()!r}"
        time.sleep(0.1)


@pytest.fixture
def slow_compiler(tmp_path):
    """A C++ compiler that takes a minute to start: a build that is still running when it is killed."""
    script = tmp_path / "slow-c++"
    script.write_text('#!/bin/sh\nsleep 60\nexec c++ "$@"\n')
    script.chmod(0o755)
    return {"CXX": str(script)}


def test_a_build_killed_part_way_blocks_nobody(tmp_path, probe, slow_compiler):
    """kill -9 of a building process (with torch's own build lock planted where the old code kept it):
    the process that waited on it says what it waits for, then builds as soon as the builder is gone."""
    root = tmp_path / "ext"
    folder = build.library_path("probe_lib", [probe], ["-O1"], root).parent
    folder.mkdir(parents=True)
    (folder / "lock").write_text("")  # what a killed torch build left behind: hung every later run before
    log_a, log_b = tmp_path / "a.err", tmp_path / "b.err"
    with open(log_a, "w") as err_a, open(log_b, "w") as err_b:
        builder = start(root, probe, env=slow_compiler, stderr=err_a)
        wait_for(log_a, "building probe_lib")
        waiter = start(root, probe, stderr=err_b)
        wait_for(log_b, "waiting for pid")
        assert f"pid {builder.pid}" in log_b.read_text()
        os.killpg(builder.pid, signal.SIGKILL)
        builder.wait()
        out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, log_b.read_text()
    assert out.split() == ["value", "42"]
    assert "building probe_lib" in log_b.read_text()
    assert not list(root.glob(".*building-*")), "the killed build's private folder is cleaned up"


def test_the_wait_is_bounded_and_names_the_lock(tmp_path, probe, slow_compiler):
    root = tmp_path / "ext"
    log_a = tmp_path / "a.err"
    with open(log_a, "w") as err_a:
        builder = start(root, probe, env=slow_compiler, stderr=err_a)
        try:
            wait_for(log_a, "building probe_lib")
            waiter = start(root, probe, wait=1.0)
            _, err = waiter.communicate(timeout=60)
        finally:
            os.killpg(builder.pid, signal.SIGKILL)
            builder.wait()
    assert waiter.returncode != 0
    assert "TimeoutError" in err and f"pid {builder.pid}" in err and "STABLELM_BUILD_WAIT" in err


def test_a_built_library_is_loaded_as_is(tmp_path, probe, monkeypatch):
    """Built once; another process (here: one whose compiler would fail, as in an environment whose include
    paths differ, or one that may not write) loads it without compiling or writing anything."""
    root = tmp_path / "ext"
    first = start(root, probe)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0 and out.split() == ["value", "42"], err
    assert "building probe_lib" in err
    library = build.library_path("probe_lib", [probe], ["-O1"], root)
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*")}
    second = start(root, probe, env={"CXX": "/bin/false"})
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0 and out.split() == ["value", "42"], err
    assert err == "" and {p: p.stat().st_mtime_ns for p in root.rglob("*")} == before and library.is_file()


def test_an_unwritable_folder_builds_for_this_process(tmp_path, probe):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = start(blocker / "ext", probe)  # cannot be created, even by root
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and out.split() == ["value", "42"], err
    assert "not cached" in err and "not writable" in err
