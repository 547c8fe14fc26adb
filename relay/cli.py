"""``python -m relay``: arguments, worker processes and signals.

One worker runs in this process. With ``--workers N`` (or
``server.workers``) the launcher prepares the shared metrics directory
*before any metric exists* (prometheus-client picks multiprocess mode at
import time), forks N workers that each bind the port with SO_REUSEPORT,
forwards SIGTERM/SIGINT to them, restarts a worker that dies, and exits 0
once they have all drained.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from .config import (
    MAX_WORKERS,
    Config,
    ConfigError,
    check_config,
    load_config,
    parse_listen_address,
    resolve_config_path,
)

__all__ = ["main"]

log = logging.getLogger("relay")

# A worker that dies this soon after start is failing, not crashing once:
# restarting it in a loop would hide the error.
MIN_WORKER_LIFETIME = 5.0


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter at the width shutil would find, without importing
    shutil: the default one does, only for that, and a worker then keeps it
    and the bz2 and lzma modules it loads (half a megabyte) for life."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_terminal_columns() - 2)


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    stdout = sys.__stdout__
    if columns <= 0 and stdout is not None:
        try:
            columns = os.get_terminal_size(stdout.fileno()).columns
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="relay",
        formatter_class=_HelpFormatter,
        description="A high-performance AI API gateway for OpenAI, Anthropic and compatible APIs.",
    )
    p.add_argument("--config", metavar="PATH", help="config file (default: $RELAY_CONFIG, "
                   "else configs/config.yaml if present, else built-in defaults)")
    p.add_argument("--port", metavar="[HOST]:PORT", help='listen address, e.g. ":8080" or "127.0.0.1:9000"')
    p.add_argument("--workers", type=int, metavar="N", help="worker processes sharing the port")
    p.add_argument("--check-config", action="store_true",
                   help="validate the config, print what is wrong and exit (0 when valid)")
    return p


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def _load(args: argparse.Namespace) -> tuple[Config, Config]:
    """The config to run with, and the file's own (before command-line
    overrides), which hot reload compares edits against."""
    path = resolve_config_path(args.config, os.environ)
    config = load_config(path, os.environ)
    file_config = config
    server = config.server
    if args.port is not None:
        host, port = parse_listen_address(args.port)
        server = dataclasses.replace(server, host=host, port=port)
    if args.workers is not None:
        if not 1 <= args.workers <= MAX_WORKERS:
            raise ValueError(f"--workers must be from 1 to {MAX_WORKERS}")
        server = dataclasses.replace(server, workers=args.workers)
    return dataclasses.replace(config, server=server), file_config


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["keys"]:
        from .keys.cli import main as keys_main

        return keys_main(argv[1:])
    args = _parser().parse_args(argv)
    if args.check_config:
        return check_config(args.config, os.environ)
    try:
        config, file_config = _load(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"relay: {problem}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"relay: --port/--workers: {exc}", file=sys.stderr)
        return 2
    if config.keys.needs_store:  # else the key modules stay unloaded for the worker's life
        from .keys.stores import check_store

        store_problem = check_store(config)
        if store_problem is not None:
            print(f"relay: {store_problem}", file=sys.stderr)
            return 2
    _setup_logging(config.log.level)
    if config.server.workers == 1:
        from .app import run_worker

        try:
            return run_worker(config, reuse_port=False, file_config=file_config)
        except OSError as exc:
            log.error("cannot listen on %s:%s: %s", config.server.host, config.server.port, exc.strerror)
            return 1
    return _run_workers(config, file_config)


def _run_workers(config: Config, file_config: Config) -> int:
    import tempfile  # the launcher's alone: a single worker never needs it

    from .ops import metrics

    metrics_dir = os.environ.get(metrics.MULTIPROC_ENV) or tempfile.mkdtemp(prefix="relay-metrics-")
    metrics.prepare_multiprocess_dir(metrics_dir)

    stopping = False
    children: dict[int, tuple[int, float]] = {}  # pid -> (worker index, start time)

    def spawn(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            code = 1
            try:
                from .app import run_worker

                code = run_worker(
                    config, reuse_port=True, worker_index=index, file_config=file_config
                )
            except OSError as exc:
                log.error("worker %d cannot listen: %s", index, exc.strerror)
            except BaseException:
                log.exception("worker %d failed", index)
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = (index, time.monotonic())

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for index in range(config.server.workers):
        spawn(index)

    exit_code = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index, started = children.pop(pid, (-1, 0.0))
        metrics.mark_worker_dead(pid)
        code = os.waitstatus_to_exitcode(status)
        if stopping or index < 0:
            continue
        if time.monotonic() - started < MIN_WORKER_LIFETIME:
            log.error("worker %d exited with %d right after start; stopping", index, code)
            exit_code = 1
            forward(signal.SIGTERM, None)
            continue
        log.error("worker %d (pid %d) exited with %d; starting a new one", index, pid, code)
        spawn(index)
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
