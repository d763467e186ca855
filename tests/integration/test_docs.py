"""The configuration documentation cannot drift from the code: every variable
the sources read is in docs/configuration.md and in the installed example
environment file, and neither documents a variable nobody reads."""

import re

from harness.stack import REPO_ROOT

# Read outside the C++ sources: by systemd/chatd.service and make run.
NOT_READ_BY_CHATD = {"CHATD_WORKERS", "PORT"}


def read_by_code() -> "set[str]":
    names = set()
    for path in (REPO_ROOT / "src").glob("*.cc"):
        names |= set(re.findall(r'"((?:CHATD|OPENAI)_[A-Z0-9_]+)"', path.read_text()))
    return names


def documented() -> "set[str]":
    text = (REPO_ROOT / "docs/configuration.md").read_text()
    return set(re.findall(r"^\| `([A-Z][A-Z0-9_]+)` \|", text, re.M))


def in_env_example() -> "set[str]":
    text = (REPO_ROOT / "systemd/chatd.env.example").read_text()
    return set(re.findall(r"^#?([A-Z][A-Z0-9_]+)=", text, re.M))


def test_every_variable_read_by_the_code_is_documented():
    code = read_by_code()
    assert len(code) > 40  # the pattern still finds them
    assert code - documented() == set()
    assert documented() - code - NOT_READ_BY_CHATD == set()


def test_the_example_environment_file_lists_every_variable():
    expected = read_by_code() | {"CHATD_WORKERS"}
    assert expected - in_env_example() == set()
    assert in_env_example() - expected == set()
