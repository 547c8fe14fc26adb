"""Installing what the suite compares against, each skipped with one clear line.

* nginx and wrk: Debian packages (``apt-get``, needs root).
* LiteLLM: its own venv in the cache dir, pinned to a release that works.
  1.107.0 is refused outright: that release was published compromised.
* Portkey gateway: ``npm install`` in the cache dir, pinned.
* matplotlib (the chart) and py-spy (``--profile``): the running Python if it
  has them, else a small tools venv in the cache dir.

Nothing is installed into the repository.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BANNED_LITELLM", "Tools", "setup_tools"]

BANNED_LITELLM = frozenset({"1.107.0"})
DEFAULT_LITELLM = "1.108.7"
DEFAULT_PORTKEY = "1.15.2"


def log(message: str) -> None:
    print(message, flush=True)


@dataclass(slots=True)
class Tools:
    nginx: str | None = None
    wrk: str | None = None
    litellm: str | None = None          # the litellm executable in its venv
    litellm_version: str | None = None
    portkey: str | None = None          # build/start-server.js
    portkey_version: str | None = None
    node: str | None = None
    chart_python: str | None = None     # a Python that can import matplotlib
    pyspy: str | None = None
    skipped: dict[str, str] = field(default_factory=dict)  # tool -> why

    def skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log(f"SKIP {name}: {why}")


def _run(argv: list[str], logfile: Path, env: dict[str, str] | None = None,
         cwd: Path | None = None, timeout: float = 900) -> bool:
    with open(logfile, "ab") as out:
        out.write(("\n$ " + " ".join(argv) + "\n").encode())
        out.flush()
        try:
            proc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                  cwd=cwd, timeout=timeout, stdin=subprocess.DEVNULL)
        except (OSError, subprocess.TimeoutExpired) as exc:
            out.write(f"\n{exc}\n".encode())
            return False
    return proc.returncode == 0


def _apt_install(packages: list[str], cache: Path) -> str | None:
    """Install Debian packages; None on success, else why not."""
    if shutil.which("apt-get") is None:
        return "apt-get not found"
    if os.geteuid() != 0:
        return "not root (install them yourself: apt-get install " + " ".join(packages) + ")"
    logfile = cache / "apt.log"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    had_service = Path("/run/nginx.pid").exists()
    log(f"installing {' '.join(packages)} with apt-get (log: {logfile})")
    if not _run(["apt-get", "update", "-qq"], logfile, env):
        return f"apt-get update failed (see {logfile})"
    ok = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], logfile, env)
    if "nginx" in packages and not had_service and Path("/run/nginx.pid").exists():
        # The package may start the system nginx on port 80: the suite did not
        # mean to leave that running.
        _run(["nginx", "-s", "quit"], logfile)
    return None if ok else f"apt-get install failed (see {logfile})"


def _ensure_binaries(tools: Tools, cache: Path, allow_install: bool) -> None:
    missing = [pkg for pkg, binary in (("nginx", "nginx"), ("wrk", "wrk"))
               if shutil.which(binary) is None and not Path(f"/usr/sbin/{binary}").exists()]
    if missing and allow_install:
        why = _apt_install(missing, cache)
        if why:
            log(f"could not install {' '.join(missing)}: {why}")
    for name in ("nginx", "wrk"):
        path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
        setattr(tools, name, path)
    if tools.nginx is None:
        tools.skip("nginx", "not installed and could not be installed; the canned upstream "
                   "falls back to relay's fake upstream and the nginx target is left out")
    if tools.wrk is None:
        tools.skip("wrk", "not installed and could not be installed; throughput and latency "
                   "scenarios are left out")


def _venv_python(path: Path) -> Path:
    return path / "bin" / "python"


def _make_venv(path: Path) -> Path:
    if not _venv_python(path).exists():
        venv.EnvBuilder(with_pip=True, clear=True).create(path)
    return _venv_python(path)


def _litellm(tools: Tools, cache: Path, version: str, allow_install: bool) -> None:
    if version in BANNED_LITELLM:
        tools.skip("litellm", f"LiteLLM {version} is refused: that release was published compromised")
        return
    home = cache / f"litellm-{version}"
    exe = home / "bin" / "litellm"
    stamp = home / "installed.json"
    if not stamp.exists():
        if not allow_install:
            tools.skip("litellm", f"not installed in {home} (run without --no-install)")
            return
        logfile = cache / f"litellm-{version}-install.log"
        log(f"installing LiteLLM {version} into {home} (log: {logfile})")
        try:
            py = _make_venv(home)
        except Exception as exc:  # venv creation needs ensurepip
            tools.skip("litellm", f"could not create a venv: {exc}")
            return
        if not (_run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"], logfile)
                and _run([str(py), "-m", "pip", "install", "-q", f"litellm[proxy]=={version}"], logfile)):
            tools.skip("litellm", f"pip install litellm[proxy]=={version} failed (see {logfile})")
            return
        stamp.write_text(json.dumps({"version": version}))
    if not exe.exists():
        tools.skip("litellm", f"{exe} missing after install")
        return
    tools.litellm = str(exe)
    tools.litellm_version = version


def _portkey(tools: Tools, cache: Path, version: str, allow_install: bool) -> None:
    node = shutil.which("node")
    npm = shutil.which("npm")
    if node is None or npm is None:
        tools.skip("portkey", "node/npm not found (apt-get install nodejs npm)")
        return
    home = cache / f"portkey-{version}"
    script = home / "node_modules" / "@portkey-ai" / "gateway" / "build" / "start-server.js"
    if not script.exists():
        if not allow_install:
            tools.skip("portkey", f"not installed in {home} (run without --no-install)")
            return
        home.mkdir(parents=True, exist_ok=True)
        logfile = cache / f"portkey-{version}-install.log"
        log(f"installing Portkey gateway {version} into {home} (log: {logfile})")
        if not (home / "package.json").exists():
            (home / "package.json").write_text('{"name": "relay-bench-portkey", "private": true}\n')
        if not _run([npm, "install", "--no-audit", "--no-fund", f"@portkey-ai/gateway@{version}"],
                    logfile, cwd=home):
            tools.skip("portkey", f"npm install @portkey-ai/gateway@{version} failed (see {logfile})")
            return
    if not script.exists():
        tools.skip("portkey", f"{script} missing after npm install")
        return
    tools.portkey = str(script)
    tools.portkey_version = version
    tools.node = node


def _has_module(python: str, module: str) -> bool:
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode == 0


def _helper_tools(tools: Tools, cache: Path, want_pyspy: bool, allow_install: bool) -> None:
    here = sys.executable
    if _has_module(here, "matplotlib"):
        tools.chart_python = here
    pyspy = shutil.which("py-spy") or str(Path(here).with_name("py-spy"))
    if Path(pyspy).exists():
        tools.pyspy = pyspy
    home = cache / "tools-venv"
    logfile = cache / "tools-install.log"
    py = _venv_python(home)
    if tools.chart_python is None and py.exists() and _has_module(str(py), "matplotlib"):
        tools.chart_python = str(py)
    if want_pyspy and tools.pyspy is None and (home / "bin" / "py-spy").exists():
        tools.pyspy = str(home / "bin" / "py-spy")
    need = []
    if tools.chart_python is None:
        need.append("matplotlib")
    if want_pyspy and tools.pyspy is None:
        need.append("py-spy")
    if not need:
        return
    if allow_install:
        log(f"installing {' '.join(need)} into {home} (log: {logfile})")
        try:
            py = _make_venv(home)
            _run([str(py), "-m", "pip", "install", "-q", *need], logfile)
        except Exception as exc:
            log(f"could not create {home}: {exc}")
    py = _venv_python(home)
    if tools.chart_python is None:
        if py.exists() and _has_module(str(py), "matplotlib"):
            tools.chart_python = str(py)
        else:
            tools.skip("chart", f"matplotlib unavailable (see {logfile}); the PNG is not drawn")
    if want_pyspy and tools.pyspy is None:
        candidate = home / "bin" / "py-spy"
        if candidate.exists():
            tools.pyspy = str(candidate)
        else:
            tools.skip("profile", f"py-spy unavailable (see {logfile})")


def setup_tools(cache: Path, *, litellm_version: str = DEFAULT_LITELLM,
                portkey_version: str = DEFAULT_PORTKEY, want_litellm: bool = True,
                want_portkey: bool = True, want_pyspy: bool = False,
                allow_install: bool = True) -> Tools:
    cache.mkdir(parents=True, exist_ok=True)
    tools = Tools()
    _ensure_binaries(tools, cache, allow_install)
    if want_litellm:
        _litellm(tools, cache, litellm_version, allow_install)
    else:
        tools.skip("litellm", "left out by --no-litellm")
    if want_portkey:
        _portkey(tools, cache, portkey_version, allow_install)
    else:
        tools.skip("portkey", "left out by --no-portkey")
    _helper_tools(tools, cache, want_pyspy, allow_install)
    return tools
