"""Instructions relay executes per request, counted by callgrind: a figure
that does not move with the machine's load, for comparing two trees or two
configurations where wall-clock rows differ by less than their noise.

    python -m benchmarks.instructions                 # every feature on, cache misses
    python -m benchmarks.instructions --variant off   # every feature off
    python -m benchmarks.instructions --hit           # every feature on, cache hits

relay (compiled, 1 worker) runs under ``valgrind --tool=callgrind`` with
instrumentation off, in front of the benchmark's nginx canned upstream. One
keep-alive connection sends warm-up requests, then instrumentation is
switched on for exactly ``--requests`` more, and the user-space instructions
of relay's process over those are divided by their number. Kernel work (the
syscalls) is not counted. Needs valgrind and nginx (installed with apt-get
when missing, as the load benchmark does).
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .procs import Processes, free_port, wait_for_port
from .run import CACHE, REPO
from .targets import CHAT_PATH, RELAY_VARIANTS, Env
from .tools import _apt_install, setup_tools

__all__ = ["instructions_per_request"]

_HEAD = (
    b"POST " + CHAT_PATH.encode() + b" HTTP/1.1\r\nHost: relay\r\n"
    b"Authorization: Bearer %s\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n"
)


def _send(port: int, secret: str, count: int, tag: str, hit: bool) -> None:
    """*count* requests on one connection, each answered 200 before the next."""
    key = secret.encode()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        reader = sock.makefile("rb")
        for i in range(count):
            content = f"instructions {tag} {0 if hit else i}"
            body = json.dumps(
                {"model": "gpt-4o", "messages": [{"role": "user", "content": content}]}
            ).encode()
            sock.sendall(_HEAD % (key, len(body)) + body)
            status = reader.readline()
            length = 0
            while (line := reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            reader.read(length)
            if not status.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"relay answered {status!r}")


def instructions_per_request(variant: str = "", hit: bool = False, requests: int = 2000) -> float:
    """User-space instructions relay runs per request (see the module doc)."""
    valgrind = shutil.which("valgrind")
    control = shutil.which("callgrind_control")
    if valgrind is None or control is None:
        raise RuntimeError("valgrind is not installed (apt-get install valgrind)")
    tools = setup_tools(CACHE, want_litellm=False, want_portkey=False)
    if tools.nginx is None:
        raise RuntimeError("nginx is needed for the canned upstream")
    workdir = Path(tempfile.mkdtemp(prefix="relay-instructions-"))
    procs = Processes(workdir)
    env = Env(REPO, workdir, procs, nginx=tools.nginx)
    relay = None
    try:
        env.start_fake_upstream()
        env.start_nginx_upstream()
        config = env.relay_config("instructions", env.canned_port, "", variant)
        port = free_port()
        out = workdir / "callgrind.out"
        relay = subprocess.Popen(
            [valgrind, "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
             sys.executable, "-m", "relay", "--config", str(config), "--port", f"127.0.0.1:{port}"],
            env=env._python_env(), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if not wait_for_port(port, 300):
            raise RuntimeError("relay did not start under valgrind")
        # The keys row's virtual key, else a client key of the bench's own.
        secret = env.virtual_key if variant == "keys" else env.relay_key
        _send(port, secret, 300, "warm", hit)  # imports, caches and pools settle first
        pid = str(relay.pid)
        subprocess.run([control, "-i", "on", pid], check=True, capture_output=True)
        _send(port, secret, requests, "counted", hit)
        subprocess.run([control, "-i", "off", pid], check=True, capture_output=True)
        subprocess.run([control, "-d", pid], check=True, capture_output=True)
        total = 0
        for path in glob.glob(f"{out}*"):
            for line in Path(path).read_text(errors="replace").splitlines():
                if line.startswith(("summary:", "totals:")):
                    total = max(total, int(line.split()[1]))
        if not total:
            raise RuntimeError("callgrind wrote no totals")
        return total / requests
    finally:
        if relay is not None:
            relay.terminate()
            try:
                relay.wait(60)
            except subprocess.TimeoutExpired:
                relay.kill()
                relay.wait()
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="", choices=["", *RELAY_VARIANTS],
                   help="one relay row of the load benchmark (default: every feature on)")
    p.add_argument("--hit", action="store_true", help="one body repeated: cache hits")
    p.add_argument("--requests", type=int, default=2000, help="requests counted (default 2000)")
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None:
        _apt_install(["valgrind"], CACHE)
    per_request = instructions_per_request(args.variant, args.hit, args.requests)
    what = RELAY_VARIANTS.get(args.variant, "") or ", every feature on"
    kind = "cache hits" if args.hit else "cache misses"
    print(f"relay (compiled, 1 worker{what}), {kind}: {per_request / 1000:.1f}k instructions "
          "per request")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
