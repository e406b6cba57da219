"""`make test` installs what it needs: scripts/system-packages.sh finds missing system packages with dpkg-query,
skips apt when nothing is missing, and, for a user who cannot install, stops with one line and exit 2 before any
test runs. The packages are installed on the machines that run this, so "missing" is a name no archive has."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.deploy.tools import ROOT, run

SCRIPT = ROOT / "scripts" / "system-packages.sh"
NO_SUCH_PACKAGE = "cellgate-no-such-package"
# Present on every Debian system (Essential: yes).
PRESENT = ("bash", "dpkg", "coreutils")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

pytestmark = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="the installer's apt path needs Debian")


def as_unprivileged(command: Sequence[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run command as a user that cannot install: `nobody` when we are root, else ourselves (without sudo)."""
    env = {"PATH": SYSTEM_PATH, "HOME": str(cwd), "LANG": "C.UTF-8"}
    if os.geteuid() == 0:
        clean_env = ["env", "-i", *(f"{k}={v}" for k, v in env.items())]
        return run(["runuser", "-u", "nobody", "--", *clean_env, *command], cwd=cwd)
    if shutil.which("sudo") and run(["sudo", "-n", "true"]).returncode == 0:
        pytest.skip("this user has password-less sudo, so it can install: the refusal path needs one that cannot")
    return run(command, cwd=cwd, env=env)


def world_readable_copy(tmp_path: Path, *names: str) -> Path:
    """The named repository files in a directory the unprivileged user may read and write."""
    copy = tmp_path / "repo"
    for name in names:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, copy / name)
        else:
            copy.mkdir(exist_ok=True)
            shutil.copy2(source, copy / name)
    for path in [copy, *copy.rglob("*")]:
        path.chmod(path.stat().st_mode | stat.S_IROTH | stat.S_IWOTH | (stat.S_IXOTH if path.is_dir() else 0))
    tmp_path.chmod(0o755)
    return copy


def test_detection_names_only_the_missing_packages() -> None:
    result = run([str(SCRIPT), "--missing", *PRESENT, NO_SUCH_PACKAGE, "python3-cellgate-nope"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [NO_SUCH_PACKAGE, "python3-cellgate-nope"]


def test_nothing_missing_means_no_apt(tmp_path: Path) -> None:
    # A tripwire first on PATH: had the script called apt-get (or sudo), the marker file would exist.
    tripwire = tmp_path / "bin"
    tripwire.mkdir()
    marker = tmp_path / "apt-was-called"
    for name in ("apt-get", "sudo"):
        (tripwire / name).write_text(f"#!/bin/sh\ntouch {marker}\nexit 1\n")
        (tripwire / name).chmod(0o755)
    result = run([str(SCRIPT), *PRESENT], env={"PATH": f"{tripwire}:{SYSTEM_PATH}"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"system packages: all {len(PRESENT)} present"
    assert not marker.exists()


def test_a_user_who_cannot_install_gets_one_line_and_exit_2(tmp_path: Path) -> None:
    copy = world_readable_copy(tmp_path, "scripts")
    result = as_unprivileged(["bash", "scripts/system-packages.sh", "redis-server", NO_SUCH_PACKAGE], copy)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: missing system packages: {NO_SUCH_PACKAGE} — run: ")
    expected = f"sudo apt-get update && sudo apt-get install -y --no-install-recommends {NO_SUCH_PACKAGE}"
    assert expected in line
    assert "redis-server" not in line  # installed, so not named


def test_make_test_stops_before_any_test_when_it_cannot_install(tmp_path: Path) -> None:
    copy = world_readable_copy(tmp_path, "Makefile", "scripts", "pyproject.toml")
    result = as_unprivileged(["make", "test", f"SYSTEM_PACKAGES={NO_SUCH_PACKAGE}"], copy)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert f"error: missing system packages: {NO_SUCH_PACKAGE} — run: sudo apt-get update" in result.stderr
    assert "phase install" in result.stdout
    assert "phase lint" not in output
    assert "pytest" not in output
    assert not (copy / ".venv").exists(), "nothing is installed before the system packages are there"
