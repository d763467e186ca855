#!/usr/bin/python3
"""`make test`: the unit tests (Boost.Test), the replay of every fuzz target's
seed corpus, and then the Python tests (pytest: the fake model's own tests and
the integration tests against the real stack).

Both runners write JUnit XML; the summary comes from those files, not from the
console, and its very last line is exactly `N passed, N failed` (failures and
errors of both runners). A runner that dies without usable XML counts as one
failure, so a crash can never look like success. Exit status 0 only when
nothing failed. Each fuzz target counts as one test: built here through make
(so a target that no longer compiles fails instead of replaying a stale
binary) and failed when its replay crashes or trips a sanitizer.

    /usr/bin/python3 tests/run_all.py --build build --fuzz-build build-fuzz
"""

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEM_PYTHON = "/usr/bin/python3"
PYTEST_PATHS = ("tests/fake_model", "tests/integration")
FUZZ_CORPORA = REPO_ROOT / "tests" / "fuzz" / "corpus"
# Bounds so a hung test ends the run instead of blocking CI forever. Far above
# the normal durations (unit tests: seconds; pytest: a few minutes).
UNIT_TIMEOUT_S = 10 * 60
PYTEST_TIMEOUT_S = 45 * 60
# Building the fuzz library the first time takes minutes on a busy machine; a
# replay takes well under a second per target.
FUZZ_BUILD_TIMEOUT_S = 20 * 60
FUZZ_REPLAY_TIMEOUT_S = 2 * 60
# -runs=0: execute each corpus input once and stop. close_fd_mask=2 keeps the
# verifier's log lines out of the console; crash reports still appear.
FUZZ_REPLAY_FLAGS = ("-runs=0", "-close_fd_mask=2", "-timeout=10")
MAX_LISTED_FAILURES = 30


@dataclass
class Outcome:
    runner: str
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    failures: "list[str]" = field(default_factory=list)
    note: str = ""


def first_message(problem: ET.Element) -> str:
    """One line saying what failed. Boost.Test's message attribute is just
    "failure"; its text has a "- message: ..." line. pytest's attribute is good."""
    lines = [line.strip() for line in (problem.text or "").splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("EXCEPTION STACK TRACE") and i + 1 < len(lines):
            return f"uncaught exception: {lines[i + 1]}"
    for line in lines:
        if line.startswith("- message:"):
            return line.split(":", 1)[1].strip()
    message = problem.get("message") or (problem.text or "").strip() or problem.tag
    return message.splitlines()[0] if message else problem.tag


def parse_junit(path: Path, runner: str) -> Outcome:
    """Counts test cases: failed when they hold a <failure> or <error>.
    Works for Boost.Test's single <testsuite> and pytest's <testsuites>."""
    outcome = Outcome(runner)
    root = ET.parse(path).getroot()
    for case in root.iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        problems = case.findall("failure") + case.findall("error")
        if problems:
            outcome.failed += 1
            outcome.failures.append(f"{name}: {first_message(problems[0])}"[:200])
        elif case.find("skipped") is not None:
            outcome.skipped += 1
        else:
            outcome.passed += 1
    return outcome


def run(runner: str, argv: "list[str]", xml_path: Path, timeout_s: int,
        env: "dict[str, str] | None" = None) -> Outcome:
    print(f"\n=== {runner}: {' '.join(argv)}", flush=True)
    xml_path.unlink(missing_ok=True)
    try:
        # Output goes straight to the console: the human-readable log.
        # start_new_session: on timeout the whole group (pytest's stack
        # included) is killed, not just the runner.
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, start_new_session=True)
    except OSError as exc:
        return Outcome(runner, failed=1, failures=[f"could not start: {exc}"], note="did not start")
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        rc = None
    try:
        outcome = parse_junit(xml_path, runner)
    except (OSError, ET.ParseError) as exc:
        why = "timed out" if rc is None else f"exit status {rc}"
        return Outcome(runner, failed=1, failures=[f"no usable JUnit XML ({exc})"], note=why)
    if rc is None:
        outcome.failed += 1
        outcome.failures.append(f"timed out after {timeout_s} s")
    elif rc != 0 and outcome.failed == 0:
        # The XML says all passed but the process says otherwise (a crash at
        # exit, a leak report of the sanitizers, pytest's "no tests ran"...).
        outcome.failed += 1
        outcome.failures.append(f"exit status {rc} although no test failed")
    return outcome


def run_command(argv: "list[str]", timeout_s: int, env: "dict[str, str] | None" = None) -> "int | None":
    """Exit status, or None when it timed out (the whole group is killed)."""
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, start_new_session=True)
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        proc.wait()
        return None


def replay_fuzz_corpora(fuzz_build: Path) -> Outcome:
    """One test per target with a seed corpus: build it, then run every seed once."""
    outcome = Outcome("fuzz replay")
    targets = sorted(p.name for p in FUZZ_CORPORA.iterdir() if p.is_dir())
    print(f"\n=== fuzz replay: {len(targets)} targets in {fuzz_build}", flush=True)
    # Relative, as the Makefile names its objects: the header dependencies it
    # recorded are keyed by those names.
    folder = os.path.relpath(fuzz_build, REPO_ROOT)
    make = ["make", "--no-print-directory", f"-j{os.cpu_count() or 1}", f"FUZZ_BUILD={folder}"]
    # Not under a parent make's jobserver: its fds are not passed down.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    for target in targets:
        try:
            rc = run_command([*make, f"{folder}/bin/{target}"], FUZZ_BUILD_TIMEOUT_S, env)
            if rc != 0:
                why = "timed out" if rc is None else f"exit status {rc}"
                outcome.failed += 1
                outcome.failures.append(f"{target}: did not build ({why})")
                continue
            rc = run_command([str(fuzz_build / "bin" / target), *FUZZ_REPLAY_FLAGS, str(FUZZ_CORPORA / target)],
                             FUZZ_REPLAY_TIMEOUT_S, env)
            why = "timed out" if rc is None else f"exit status {rc}"
        except OSError as exc:
            rc, why = -1, f"could not start: {exc}"
        if rc == 0:
            outcome.passed += 1
        else:
            outcome.failed += 1
            outcome.failures.append(f"{target}: replay failed ({why})")
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--build", default="build", help="build folder (make's BUILD)")
    parser.add_argument("--fuzz-build", default="build-fuzz", help="fuzz build folder (make's FUZZ_BUILD)")
    args = parser.parse_args()
    build = (REPO_ROOT / args.build).resolve()
    fuzz_build = (REPO_ROOT / args.fuzz_build).resolve()

    outcomes = []
    with tempfile.TemporaryDirectory(prefix="chatd-test-results-") as results:
        results_dir = Path(results)
        unit_xml = results_dir / "unit.xml"
        color = "yes" if sys.stdout.isatty() else "no"
        outcomes.append(run("unit (Boost.Test)", [
            str(build / "bin" / "unit_tests"),
            # HRF on the console, JUnit into the file; only problems are logged
            # in both, the short report says how many cases ran.
            f"--logger=HRF,error,stdout:JUNIT,error,{unit_xml}",
            "--report_level=short", f"--color_output={color}",
        ], unit_xml, UNIT_TIMEOUT_S))

        outcomes.append(replay_fuzz_corpora(fuzz_build))

        py_xml = results_dir / "pytest.xml"
        env = dict(os.environ, CHATD_BUILD_DIR=str(build), PYTHONDONTWRITEBYTECODE="1")
        outcomes.append(run("pytest", [
            SYSTEM_PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", *PYTEST_PATHS,
            f"--junitxml={py_xml}",
        ], py_xml, PYTEST_TIMEOUT_S, env))

    print("\n=== summary")
    for o in outcomes:
        note = f" ({o.note})" if o.note else ""
        skipped = f", {o.skipped} skipped" if o.skipped else ""
        print(f"{o.runner}: {o.passed} passed, {o.failed} failed{skipped}{note}")
        for failure in o.failures[:MAX_LISTED_FAILURES]:
            print(f"  FAILED {failure}")
        if len(o.failures) > MAX_LISTED_FAILURES:
            print(f"  ... and {len(o.failures) - MAX_LISTED_FAILURES} more")
    passed = sum(o.passed for o in outcomes)
    failed = sum(o.failed for o in outcomes)
    print(f"{passed} passed, {failed} failed", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
