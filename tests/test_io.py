"""Atomic writes: whole or nothing, strict JSON, and the file mode kept."""

import json
import math
import os
import stat

import pytest

from memeff.io import atomic_write, write_json


def test_interrupted_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "suite.json"
    write_json(path, {"old": True})

    def fail_half_way(f):
        f.write(b'{"new": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail_half_way)
    assert json.loads(path.read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["suite.json"]


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("old\n")
    os.chmod(path, 0o644)
    atomic_write(path, lambda f: f.write(b"new\n"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)
    atomic_write(path, lambda f: f.write(b"newer\n"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "newer\n"


def test_a_new_file_gets_the_umask_default_mode(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "new.bin", lambda f: f.write(b"x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "new.bin").stat().st_mode) == 0o640


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_json_with_a_non_finite_number_is_refused_and_nothing_is_written(tmp_path, value):
    path = tmp_path / "result.json"
    with pytest.raises(ValueError):
        write_json(path, {"loss": value})
    assert not path.exists() and not list(tmp_path.iterdir())


def test_a_held_directory_refuses_a_second_holder_naming_the_first(tmp_path):
    from memeff.io import directory_lock

    with directory_lock(tmp_path / "run"):
        with pytest.raises(ValueError, match=f"in use by another run \\(process {os.getpid()}\\)"):
            with directory_lock(tmp_path / "run"):
                pass
    with directory_lock(tmp_path / "run"):  # free again once the first holder is done
        pass


def test_a_waiting_holder_gets_the_directory_when_the_first_process_dies(tmp_path):
    """With ``wait``, the second holder blocks until the first process ends (here killed)."""
    import subprocess
    import sys
    import time

    from memeff.io import LOCK_NAME, directory_lock

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from memeff.io import directory_lock\n"
        f"with directory_lock({str(tmp_path)!r}):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ValueError, match=f"process {holder.pid}"):
            with directory_lock(tmp_path):
                pass
        start = time.monotonic()
        killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill -9 {holder.pid}"])
        with directory_lock(tmp_path, wait=True):
            assert holder.wait(5) == -9
            assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert time.monotonic() - start >= 0.9
        killer.wait()
    finally:
        holder.kill()
        holder.wait()


def test_a_directory_under_a_file_is_a_clear_error(tmp_path):
    from memeff.io import directory_lock

    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot write into"):
        with directory_lock(tmp_path / "file" / "run"):
            pass
