"""Fixtures of the integration tests: the real stack (Redis, Chroma, the fake
model, chatd workers behind nginx), started once per session and always
stopped, plus a factory for extra pools with their own configuration."""

import os
import sys
import uuid
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS_DIR))

from harness.stack import REPO_ROOT, UNCAPPED, Frontend, Redis, Stack  # noqa: E402

DEFAULT_WORKERS = 2
DEFAULT_THREADS = 4
LOG_TAIL_ON_FAILURE_CHARS = 3000


@pytest.fixture(scope="session")
def build_dir() -> Path:
    # run_all.py sets it (`make asan` runs the same tests on build-asan).
    return Path(os.environ.get("CHATD_BUILD_DIR", REPO_ROOT / "build")).resolve()


@pytest.fixture(scope="session")
def stack(build_dir):
    # The session's pool serves tests that send many chats of one user at once
    # to test something else (exact rate limits, concurrent turns): the
    # per-user cap on chats in flight is raised here on purpose, so it does not
    # turn their bursts into 429 too_many_concurrent. test_concurrency_cap.py
    # tests the cap on pools of its own.
    started = Stack.start(build_dir, {"CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED}, workers=DEFAULT_WORKERS,
                          threads=DEFAULT_THREADS, with_chroma=True)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def new_pool(stack):
    """new_pool(env_overrides=None, workers=2, threads=4) -> Frontend (.pool,
    .nginx, .url): another pool behind its own nginx, sharing the stack's
    Redis, Chroma and fake model; stopped at the end of the test."""
    created: "list[Frontend]" = []

    def factory(env_overrides=None, workers=DEFAULT_WORKERS, threads=DEFAULT_THREADS) -> Frontend:
        frontend = stack.new_pool(env_overrides, workers=workers, threads=threads)
        created.append(frontend)
        return frontend

    yield factory
    for frontend in created:
        frontend.stop()


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of the test's own, for pools whose index stream must not be
    shared with the session's indexers."""
    redis = Redis(tmp_path / "own-redis").start()
    try:
        yield redis
    finally:
        redis.stop()


@pytest.fixture
def unique():
    """unique("label") -> a fresh id usable as userId and as message marker:
    tests never see each other's users, rate-limit budgets or messages."""
    def make(label: str = "t") -> str:
        return f"{label}-{uuid.uuid4().hex[:16]}"
    return make


# What a sanitizer build (make asan) prints when it finds a bug in a worker.
# The worker dies and multiwatch replaces it, so without this check a test
# that does not watch pids could pass over a memory error.
SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:")


@pytest.fixture(autouse=True)
def no_sanitizer_reports(request):
    yield
    if "stack" not in request.fixturenames:
        return
    running = request.getfixturevalue("stack")
    for frontend in running.frontends:
        text = frontend.pool.log_text()
        for marker in SANITIZER_MARKERS:
            assert marker not in text, f"sanitizer report in a worker's log:\n{text[text.index(marker) - 200:][:3000]}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    # What chatd and nginx said while the test ran is the first thing one
    # needs to understand a failure.
    running = item.funcargs.get("stack")
    if isinstance(running, Stack):
        if running.pool is not None:
            report.sections.append(("chatd log (tail)", running.pool.log_text()[-LOG_TAIL_ON_FAILURE_CHARS:]))
        if running.nginx is not None:
            report.sections.append(("nginx error log (tail)",
                                    running.nginx.error_log_text()[-LOG_TAIL_ON_FAILURE_CHARS:]))
        # Extra pools of this test still run (new_pool stops them at teardown).
        for i, frontend in enumerate(running.frontends[1:], start=1):
            if frontend.pool.running():
                report.sections.append((f"extra pool {i} log (tail)",
                                        frontend.pool.log_text()[-LOG_TAIL_ON_FAILURE_CHARS:]))
