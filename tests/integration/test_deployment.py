"""Deployment (issue 6): `make install` into a temporary DESTDIR, the systemd
units and the nginx site as installed, the stack run from the installed files,
/api/health reporting a stopped dependency, and /metrics summed over the pool."""

import grp
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.stack import (REPO_ROOT, UNCAPPED, Chroma, Nginx, Pool, Redis, concurrently, free_port, http_request,
                           poll_until, post_chat)

PREFIX = "/usr/local"
UNITS = ("chatd.service", "chroma.service", "chatd-cleanup.service", "chatd-cleanup.timer")
RECOVERY_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def installed(build_dir, tmp_path_factory):
    """The tree `make install DESTDIR=...` produces."""
    destdir = tmp_path_factory.mktemp("destdir")
    done = subprocess.run(["make", "-s", "install", f"DESTDIR={destdir}", f"PREFIX={PREFIX}",
                           f"BUILD={os.path.relpath(build_dir, REPO_ROOT)}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return destdir


def test_install_puts_every_file_in_place_with_its_mode(installed):
    for binary in ("chatd", "chatd-cleanup"):
        path = installed / PREFIX.lstrip("/") / "bin" / binary
        assert path.is_file() and os.access(path, os.X_OK), path
    for unit in UNITS:
        assert (installed / "etc/systemd/system" / unit).is_file(), unit
    env_example = installed / "etc/chatd/chatd.env.example"
    assert stat.S_IMODE(env_example.stat().st_mode) == 0o640
    assert (installed / "etc/nginx/sites-available/chatd.conf").is_file()
    assert (installed / PREFIX.lstrip("/") / "share/doc/chatd/deployment.md").is_file()


def own_group() -> str:
    """A group this process may chgrp to, standing in for the service's group."""
    return grp.getgrgid(os.getgid()).gr_name


def make_install(build_dir, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "-s", "install", f"BUILD={os.path.relpath(build_dir, REPO_ROOT)}", *args],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_install_gives_etc_chatd_to_the_service_group(build_dir, tmp_path):
    # Issue 12: /etc/chatd was root:root 0750, so the service user could not
    # read its *_FILE secrets there.
    group = grp.getgrnam(own_group())
    done = make_install(build_dir, f"DESTDIR={tmp_path}", f"CHATD_GROUP={group.gr_name}")
    assert done.returncode == 0, done.stdout + done.stderr
    folder = (tmp_path / "etc/chatd").stat()
    assert stat.S_IMODE(folder.st_mode) == 0o750 and folder.st_gid == group.gr_gid
    example = (tmp_path / "etc/chatd/chatd.env.example").stat()
    assert stat.S_IMODE(example.st_mode) == 0o640 and example.st_gid == group.gr_gid
    # The docs say the same: the group exists before install, and owns the folder.
    deployment = (REPO_ROOT / "docs/deployment.md").read_text()
    assert deployment.index("adduser --system --group") < deployment.index("make install")
    assert "root:chatd" in deployment and "0750" in deployment


def test_install_without_the_service_group_fails_for_real_and_warns_into_a_destdir(build_dir, tmp_path):
    missing = "chatd-no-such-group"
    packaged = make_install(build_dir, f"DESTDIR={tmp_path / 'destdir'}", f"CHATD_GROUP={missing}")
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    assert "warning" in packaged.stderr and missing in packaged.stderr
    assert stat.S_IMODE((tmp_path / "destdir/etc/chatd").stat().st_mode) == 0o750
    real = make_install(build_dir, f"PREFIX={tmp_path / 'prefix'}", f"SYSCONFDIR={tmp_path / 'etc'}",
                        f"CHATD_GROUP={missing}")
    assert real.returncode != 0
    assert "adduser --system --group chatd" in real.stderr


def test_uninstall_removes_what_install_added(build_dir, tmp_path):
    rel_build = f"BUILD={os.path.relpath(build_dir, REPO_ROOT)}"
    for target in ("install", "uninstall"):
        done = subprocess.run(["make", "-s", target, f"DESTDIR={tmp_path}", rel_build], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    left = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert left == [], left


def test_installed_units_pass_systemd_analyze_verify(build_dir, tmp_path):
    # verify wants the executables the units name to exist: install under a
    # real prefix (no DESTDIR) and give chroma.service the repo's virtualenv.
    prefix = tmp_path / "prefix"
    sysconf = tmp_path / "etc"
    done = subprocess.run(["make", "-s", "install", f"PREFIX={prefix}", f"SYSCONFDIR={sysconf}",
                           f"CHATD_GROUP={own_group()}", f"BUILD={os.path.relpath(build_dir, REPO_ROOT)}"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    venv_bin = prefix / "lib/chatd/chroma-venv/bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "chroma").symlink_to(REPO_ROOT / ".venv/chroma/bin/chroma")
    units = [str(sysconf / "systemd/system" / u) for u in UNITS]
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                            timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # Nothing to complain about, not even a warning.
    assert verify.stdout.strip() == "" and verify.stderr.strip() == "", verify.stdout + verify.stderr
    service = (sysconf / "systemd/system/chatd.service").read_text()
    assert f"{prefix}/bin/chatd" in service and "/usr/local" not in service


def installed_site_for(installed: Path, socket_path: Path, port: int) -> str:
    """The installed site, pointed at a test socket and port."""
    site = (installed / "etc/nginx/sites-available/chatd.conf").read_text()
    assert "listen 80;" in site and "/run/chatd/chatd.sock" in site
    return site.replace("listen 80;", f"listen 127.0.0.1:{port};").replace("/run/chatd/chatd.sock", str(socket_path))


class InstalledNginx(Nginx):
    """nginx serving the installed site file instead of the repo template."""

    def __init__(self, tmpdir, site_text: str, port: int) -> None:
        super().__init__(tmpdir, pool_socket="/nonexistent", port=port)
        self.site_text = site_text

    def render(self):
        conf = super().render()
        (self.prefix / "chatd-site.conf").write_text(self.site_text)
        return conf


def test_installed_nginx_site_passes_nginx_t(installed, tmp_path):
    nginx = InstalledNginx(tmp_path, installed_site_for(installed, tmp_path / "chatd.sock", free_port()), 0)
    status, output = nginx.test_config()
    assert status == 0, output
    assert "syntax is ok" in output


def test_the_stack_runs_from_the_installed_files(stack, installed, tmp_path, unique):
    pool = Pool(tmp_path / "pool", installed / PREFIX.lstrip("/"), stack.pool_env(threads=2), workers=2, threads=2)
    assert pool.binary == installed / PREFIX.lstrip("/") / "bin/chatd"
    pool.start()
    nginx = InstalledNginx(tmp_path / "nginx", installed_site_for(installed, pool.socket_path, free_port()), 0)
    nginx.port = free_port()
    nginx.site_text = installed_site_for(installed, pool.socket_path, nginx.port)
    try:
        nginx.start()
        user = unique("installed")
        status, _, body = post_chat(nginx.url, user, "Hello from the installed files")
        assert status == 200, body
        assert "last_user=Hello from the installed files" in body["response"]
        status, _, body = http_request(nginx.url, "GET", "/api/health")
        assert status == 200 and body["status"] == "ok", body
        status, _, body = post_chat(nginx.url, user, "x" * 70000)
        assert status == 413 and body["code"] == "body_too_large"
    finally:
        nginx.stop()
        pool.stop()


def test_health_names_a_stopped_redis_or_chroma(stack, new_pool, tmp_path):
    redis = Redis(tmp_path / "r").start()
    chroma = Chroma(tmp_path / "c").start()
    try:
        front = new_pool({"CHATD_REDIS_HOST": redis.host, "CHATD_REDIS_PORT": str(redis.port),
                          "CHATD_CHROMA_URL": chroma.url})
        # The pool answers as soon as one worker is up; the other registers
        # its heartbeat moments later (seen failing under load without this).
        answer = poll_until(
            lambda: (lambda r: r if r[2].get("workers") == 2 else None)(http_request(front.url, "GET", "/api/health")),
            timeout=RECOVERY_TIMEOUT_S)
        assert answer, "the second worker never reported"
        status, _, body = answer
        assert status == 200, body
        assert body["status"] == "ok"
        assert body["dependencies"] == {"redis": "ok", "chroma": "ok", "model": "configured"}

        redis.stop()
        # Answers are cached for a second per worker: poll until both workers saw it.
        down = poll_until(lambda: all(http_request(front.url, "GET", "/api/health")[0] == 503 for _ in range(4)),
                          timeout=RECOVERY_TIMEOUT_S)
        assert down
        status, _, body = http_request(front.url, "GET", "/api/health")
        assert status == 503 and body["dependencies"]["redis"] == "down" and "redis" in body["error"]
        assert body["dependencies"]["chroma"] == "ok"
        redis.start()

        chroma.stop()
        poll_until(lambda: http_request(front.url, "GET", "/api/health")[2].get("dependencies", {}).get("redis")
                   == "ok", timeout=RECOVERY_TIMEOUT_S)
        status, _, body = poll_until(
            lambda: (lambda r: r if r[0] == 503 and r[2]["dependencies"]["redis"] == "ok" else None)(
                http_request(front.url, "GET", "/api/health")), timeout=RECOVERY_TIMEOUT_S)
        assert body["dependencies"]["chroma"] == "down" and "chroma" in body["error"]
        chroma.start()
        assert poll_until(lambda: http_request(front.url, "GET", "/api/health")[0] == 200, timeout=RECOVERY_TIMEOUT_S)
    finally:
        redis.stop()
        chroma.stop()


def scrape(url: str) -> "dict[str, float]":
    status, headers, text = http_request(url, "GET", "/metrics")
    assert status == 200, text
    assert headers["content-type"].startswith("text/plain")
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_metrics_summed_over_the_pool_match_the_requests_sent(new_pool, unique):
    # Eight chats of one user at once are counted, not capped: cap raised on purpose.
    front = new_pool({"CHATD_RATE_LIMIT": "1000", "CHATD_MAX_CONCURRENT_PER_USER": UNCAPPED}, workers=3, threads=2)
    before = scrape(front.url)
    user = unique("metrics")
    ok, bad, wrong_method = 24, 9, 5
    concurrently(lambda: post_chat(front.url, user, "count me"), [() for _ in range(ok)], max_workers=8)
    concurrently(lambda: post_chat(front.url, user, ""), [() for _ in range(bad)], max_workers=8)
    concurrently(lambda: post_chat(front.url, user, "x", method="GET"), [() for _ in range(wrong_method)])
    after = scrape(front.url)

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)

    # The first scrape is itself a 200, counted once it was answered.
    assert delta('chatd_requests_total{status="200"}') == ok + 1
    assert delta('chatd_requests_total{status="400"}') == bad
    assert delta('chatd_requests_total{status="405"}') == wrong_method
    assert delta("chatd_request_duration_seconds_count") == ok + bad + wrong_method + 1
    assert delta("chatd_model_calls_total") == ok
    assert after["chatd_workers_alive"] == 3
    assert after["chatd_index_backlog"] >= 0
    # Served by several workers, yet one set of numbers: every worker's log
    # has requests, and the total above covers all of them.
    pids = {r["pid"] for r in front.pool.log_records() if r.get("event") == "request"}
    assert len(pids) >= 2, pids


def test_metrics_are_refused_to_other_addresses(stack):
    site = (REPO_ROOT / "nginx/chatd-site.conf.in").read_text()
    block = re.search(r"location = /metrics \{(.*?)\}", site, re.S).group(1)
    assert "allow 127.0.0.1;" in block and "deny all;" in block


def test_a_reply_is_counted_and_logged_before_the_client_has_it(new_pool):
    # Issue 12: counters were bumped after FCGX_Finish_r, so a scrape right
    # after an answer could miss it (seen as 3 of 5 405s under CPU load). Each
    # check here comes straight after its reply, with no polling: the count
    # must already be there.
    front = new_pool(workers=2, threads=2)
    before = scrape(front.url)
    for sent in range(1, 13):
        status, _, _ = post_chat(front.url, "u", "x", method="GET")
        assert status == 405
        after = scrape(front.url)
        counted = after.get('chatd_requests_total{status="405"}', 0) - before.get('chatd_requests_total{status="405"}', 0)
        assert counted == sent
        logged = [r for r in front.pool.log_records()
                  if r.get("event") == "request" and r.get("status") == 405 and r.get("path") == "/api/chat"]
        assert len(logged) == sent
