"""setup.py: a failed or skipped extension build must not fail the install."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import relay._fast as fast

ROOT = Path(fast.__file__).resolve().parents[2]
BANNER = "relay: C extensions could not be built, falling back to pure Python:"


def build(tmp_path: Path, **env_overrides: str) -> subprocess.CompletedProcess[str]:
    # Out of tree (--build-lib): the checkout's own extensions stay untouched.
    env = {**os.environ, **env_overrides}
    return subprocess.run(
        [
            sys.executable,
            "setup.py",
            "build_ext",
            "--build-lib",
            str(tmp_path / "lib"),
            "--build-temp",
            str(tmp_path / "temp"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def built_extensions(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "lib").rglob("*_c.*so")) + sorted((tmp_path / "lib").rglob("*.pyd"))


def test_compiler_failure_falls_back_with_a_banner(tmp_path: Path) -> None:
    result = build(tmp_path, CC="false", RELAY_NO_EXTENSIONS="")
    assert result.returncode == 0, result.stderr
    assert BANNER in result.stderr
    assert built_extensions(tmp_path) == []


def test_flag_skips_the_build(tmp_path: Path) -> None:
    result = build(tmp_path, RELAY_NO_EXTENSIONS="1")
    assert result.returncode == 0, result.stderr
    assert "RELAY_NO_EXTENSIONS is set, not building C extensions" in result.stderr
    assert BANNER not in result.stderr
    assert built_extensions(tmp_path) == []
