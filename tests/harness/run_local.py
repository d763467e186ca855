#!/usr/bin/python3
"""`make run`: the whole stack in the foreground, for trying chatd by hand.

Redis keeps its data (AOF) in ./.run/redis and Chroma in ./.run/chroma, so
memory survives restarts. Without OPENAI_API_KEY the answers come from the
offline fake model. nginx listens on 127.0.0.1:${PORT:-8080}. Ctrl-C or
SIGTERM stops everything in order and exits 0.

Environment: CHATD_WORKERS (default 2) and CHATD_THREADS (default 8) size the
pool; CHATD_AUTH_MODE defaults to off here; every other CHATD_* and OPENAI_*
variable is passed to chatd as it is.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from harness.stack import (REPO_ROOT, Chroma, FakeModel, Nginx, Pool, Redis,  # noqa: E402
                           StackError, nginx_limits_for)

STATE_DIR = REPO_ROOT / ".run"
DEFAULT_PORT = 8080
DEFAULT_WORKERS = 2
DEFAULT_THREADS = 8
# The key chatd sends to the fake, which only checks that one is present.
FAKE_API_KEY = "offline-fake-model"
FAKE_CHUNK_DELAY_MS = 50
# A unix socket path longer than this does not fit in sockaddr_un.
MAX_SOCKET_PATH = 100
WATCH_INTERVAL_S = 0.5


def say(text: str = "") -> None:
    print(text, flush=True)


def banner(lines: "list[str]") -> None:
    width = max(len(line) for line in lines) + 4
    say("*" * width)
    for line in lines:
        say(f"* {line.ljust(width - 4)} *")
    say("*" * width)


def positive_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise SystemExit(f"run_local: {name}={raw!r} must be a positive integer")
    return int(raw)


class LogFollower(threading.Thread):
    """Copies new lines of the pool's log (one JSON line per request) to the
    console, so `make run` shows what happens."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stop_event = threading.Event()

    def run(self) -> None:
        offset = 0
        while not self.stop_event.wait(WATCH_INTERVAL_S):
            try:
                with open(self.path, "rb") as f:
                    f.seek(offset)
                    data = f.read()
            except OSError:
                continue
            end = data.rfind(b"\n") + 1  # only whole lines
            if end:
                sys.stdout.write(data[:end].decode(errors="replace"))
                sys.stdout.flush()
                offset += end


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build", help="build folder (make's BUILD)")
    args = parser.parse_args()
    build = Path(args.build) if os.path.isabs(args.build) else REPO_ROOT / args.build

    port = positive_int_env("PORT", DEFAULT_PORT)
    workers = positive_int_env("CHATD_WORKERS", DEFAULT_WORKERS)
    threads = positive_int_env("CHATD_THREADS", DEFAULT_THREADS)
    use_fake = not os.environ.get("OPENAI_API_KEY")

    STATE_DIR.mkdir(exist_ok=True)
    # Sockets, nginx prefix and logs of this run; Redis and Chroma data stay.
    runtime = STATE_DIR / "runtime"
    shutil.rmtree(runtime, ignore_errors=True)
    runtime.mkdir()
    socket_dir = runtime
    if len(str(runtime / "pool" / "chatd.sock")) > MAX_SOCKET_PATH:
        socket_dir = Path(tempfile.mkdtemp(prefix="chatd-run-"))

    stop_requested = threading.Event()
    received = []

    def on_signal(signum, _frame):
        received.append(signum)
        stop_requested.set()

    def check_stop() -> None:
        # A Ctrl-C during a slow start (Chroma) stops before the next service.
        if stop_requested.is_set():
            raise StackError("interrupted while starting")

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    started = []  # in start order; stopped in reverse
    follower = None
    status = 0
    try:
        say(f"run_local: Redis (data in {STATE_DIR / 'redis'}) ...")
        redis = Redis(STATE_DIR).start()
        started.append(redis)
        check_stop()
        say(f"run_local: Chroma (data in {STATE_DIR / 'chroma'}) ...")
        chroma = Chroma(STATE_DIR).start()
        started.append(chroma)
        check_stop()

        env = {k: v for k, v in os.environ.items()
               if k.startswith(("CHATD_", "OPENAI_")) and k != "CHATD_WORKERS"}
        env.update({
            "CHATD_REDIS_HOST": redis.host,
            "CHATD_REDIS_PORT": str(redis.port),
            "CHATD_CHROMA_URL": chroma.url,
            "CHATD_THREADS": str(threads),
        })
        env.setdefault("CHATD_METRICS_FILE", str(runtime / "metrics"))
        auth_defaulted = "CHATD_AUTH_MODE" not in env
        env.setdefault("CHATD_AUTH_MODE", "off")

        if use_fake:
            say("run_local: fake model ...")
            # A pause between streamed chunks, so that `curl -N` shows the reply arriving word by word.
            fake = FakeModel(runtime, quiet=True, chunk_delay_ms=FAKE_CHUNK_DELAY_MS).start()
            started.append(fake)
            check_stop()
            env["OPENAI_BASE_URL"] = fake.url
            env["OPENAI_API_KEY"] = FAKE_API_KEY

        say(f"run_local: chatd pool ({workers} workers x {threads} threads) ...")
        pool = Pool(socket_dir / "pool", build, env, workers=workers, threads=threads,
                    log_path=runtime / "chatd.log")
        pool.start()
        started.append(pool)
        check_stop()
        max_body, read_timeout = nginx_limits_for(env)
        say(f"run_local: nginx on 127.0.0.1:{port} ...")
        nginx = Nginx(runtime / "nginx", pool.socket_path, max_body_bytes=max_body, read_timeout_s=read_timeout,
                      port=port, access_log=True)
        nginx.start()
        started.append(nginx)

        say()
        if use_fake:
            banner([
                "OPENAI_API_KEY is not set: answers come from the OFFLINE FAKE MODEL",
                "(tests/fake_model/fake_openai.py), not from a real language model.",
                "Its replies only echo what chatd sent it. For real answers:",
                "  OPENAI_API_KEY=sk-... make run",
                "(and OPENAI_BASE_URL=... for another OpenAI-compatible server).",
            ])
        else:
            say(f"run_local: model at {env.get('OPENAI_BASE_URL', 'https://api.openai.com/v1')}")
        if auth_defaulted:
            say("run_local: CHATD_AUTH_MODE=off (no access control; set CHATD_AUTH_MODE to change it)")
        else:
            say(f"run_local: CHATD_AUTH_MODE={env['CHATD_AUTH_MODE']}")
        say(f"run_local: chatd log: {pool.log_path} (request lines follow below)")
        say(f"run_local: nginx logs: {nginx.prefix}")
        say()
        say("Try:")
        say(f"  curl -s localhost:{port}/api/chat -H 'Content-Type: application/json' "
            "-d '{\"userId\":\"alice\",\"message\":\"Hi\"}'")
        say()
        say("Ctrl-C stops everything.")

        follower = LogFollower(pool.log_path)
        follower.start()
        while not stop_requested.wait(WATCH_INTERVAL_S):
            dead = [s for s in started if not s.running()]
            if dead:
                say(f"run_local: {', '.join(s.name for s in dead)} exited unexpectedly; stopping")
                status = 1
                break
    except StackError as exc:
        if stop_requested.is_set():
            say("run_local: interrupted while starting")
        else:
            say(f"run_local: {exc}")
            status = 1
    finally:
        # Signals during the shutdown would interrupt it half-way: it is short
        # and bounded, so let it finish.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if follower is not None:
            follower.stop_event.set()
            follower.join(timeout=2)
        say()
        for service in reversed(started):
            took = service.stop()
            say(f"run_local: stopped {service.name} ({took:.1f} s)")
        if socket_dir != runtime:
            shutil.rmtree(socket_dir, ignore_errors=True)
    if received and status == 0:
        say(f"run_local: stopped by {signal.Signals(received[0]).name}")
    return status


if __name__ == "__main__":
    sys.exit(main())
