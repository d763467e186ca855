"""Issue 12 B: Redis and Chroma were used without credentials. chatd now
authenticates to Redis (requirepass, or an ACL user limited to the rules
shipped in systemd/redis-acl.conf.example), and sends a token to Chroma and
uses a configured tenant and database."""

import http.server
import os
import subprocess
import threading
import urllib.request
from pathlib import Path

import pytest

from harness.chroma_layout import shard_name, shard_of
from harness import keys as rkeys
from harness.stack import REPO_ROOT, Redis, http_json, json_log_records, poll_until, post_chat

ACL_EXAMPLE = REPO_ROOT / "systemd/redis-acl.conf.example"
INDEX_TIMEOUT_S = 60
CLEANUP_TIMEOUT_S = 120


def secret_file(folder: Path, name: str, value: str) -> str:
    path = folder / name
    path.write_text(value + "\n")
    path.chmod(0o600)
    return str(path)


def chat_ok(url: str, user: str, message: str) -> None:
    status, _, body = post_chat(url, user, message)
    assert status == 200, body
    assert f"last_user={message}" in body["response"], body


@pytest.fixture
def make_redis(tmp_path):
    """make_redis(**options) -> a started Redis of the test's own (requirepass, ACL file ...)."""
    started = []

    def make(**options) -> Redis:
        redis = Redis(tmp_path / f"redis-{len(started)}", **options).start()
        started.append(redis)
        return redis

    yield make
    for redis in started:
        redis.stop()


def test_redis_without_credentials_requirepass_is_used_and_a_wrong_one_is_a_clear_error(
        make_redis, new_pool, unique, tmp_path):
    password = unique("pass")
    redis = make_redis(requirepass=password)
    good = new_pool({"CHATD_REDIS_PORT": str(redis.port),
                     "CHATD_REDIS_PASSWORD_FILE": secret_file(tmp_path, "good", password)})
    chat_ok(good.url, unique("u"), unique("m"))

    wrong = unique("wrong")
    bad = new_pool({"CHATD_REDIS_PORT": str(redis.port),
                    "CHATD_REDIS_PASSWORD_FILE": secret_file(tmp_path, "bad", wrong)})
    status, _, body = post_chat(bad.url, unique("u"), "refused")
    assert status == 503, body
    # The workers keep running (no crash loop) and say why, without the password.
    refused = [r for r in bad.pool.log_records() if r.get("event") == "redis_access_failed"]
    assert refused and refused[0]["reason"] == "redis_auth_failed", bad.pool.log_text()[-2000:]
    assert "WRONGPASS" in refused[0]["detail"]
    assert wrong not in bad.pool.log_text()
    assert len(bad.pool.worker_pids()) == bad.pool.workers


def acl_file(folder: Path, password: str, admin_password: str) -> Path:
    """The shipped ACL with a real password, plus an admin for the test's own checks."""
    text = ACL_EXAMPLE.read_text().replace(">CHANGE-ME", f">{password}")
    assert f">{password}" in text
    path = folder / "users.acl"
    path.write_text(text + f"user admin on >{admin_password} ~* &* +@all\n")
    return path


def run_cleanup(build_dir: Path, env: "dict[str, str]", *args: str) -> "list[dict]":
    proc = subprocess.run([str(build_dir / "bin" / "chatd-cleanup"), *args], env=env, capture_output=True,
                          text=True, timeout=CLEANUP_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json_log_records(proc.stderr)


def test_redis_acl_user_with_exactly_the_shipped_rules_runs_chats_indexer_and_cleanup(
        stack, make_redis, new_pool, unique, tmp_path, build_dir):
    password, admin = unique("chatd-pass"), unique("admin-pass")
    redis = make_redis(acl_file=acl_file(tmp_path, password, admin), admin=["admin", admin])
    assert redis.command("ACL", "WHOAMI") == b"admin"
    env = {"CHATD_REDIS_PORT": str(redis.port), "CHATD_REDIS_USERNAME": "chatd",
           "CHATD_REDIS_PASSWORD_FILE": secret_file(tmp_path, "redis-pass", password),
           "CHATD_RATE_ALGORITHM": "sliding"}
    front = new_pool(env)
    users = [unique("acl"), unique("acl")]
    for user in users:
        chat_ok(front.url, user, unique("first"))
    # After a restart's NOSCRIPT the scripts go by EVAL: flush them to take that path.
    redis.command("SCRIPT", "FLUSH")
    for user in users:
        chat_ok(front.url, user, unique("second"))
    # Idempotency keys: the claim, the answer kept by the record script, a
    # replay, and the release of a claim whose chat failed.
    keyed = unique("keyed")
    first = post_chat(front.url, users[0], keyed, headers={"Idempotency-Key": keyed})
    replay = post_chat(front.url, users[0], keyed, headers={"Idempotency-Key": keyed})
    assert first[0] == replay[0] == 200 and replay[2]["turnId"] == first[2]["turnId"], (first, replay)
    failed = post_chat(front.url, users[0], f"{keyed} #fake:status=400", headers={"Idempotency-Key": keyed + "-2"})
    assert failed[0] == 502, failed

    # The indexer (XGROUP, XREADGROUP, XACK, XDEL, scripts) empties the stream.
    indexed = poll_until(lambda: rkeys.total_len(redis, rkeys.all_index_streams()) == 0, INDEX_TIMEOUT_S)
    assert indexed, front.pool.log_text()[-3000:]
    assert not any(r.get("event") in ("index_retry", "redis_access_failed") for r in front.pool.log_records())

    cleanup_env = {k: v for k, v in stack.pool_env(2, env).items() if v is not None}
    cleanup_env.update(PATH=os.environ.get("PATH", "/usr/bin:/bin"), CHATD_CLEANUP_INACTIVE_S="0",
                       CHATD_ARCHIVE_DIR=str(tmp_path / "archive"))
    summary = run_cleanup(build_dir, cleanup_env, "run")[-1]
    assert summary["archived"] == len(users) and summary["failed"] == 0, summary
    run_cleanup(build_dir, cleanup_env, "restore", users[0])
    run_cleanup(build_dir, cleanup_env, "forget", users[0])
    assert redis.command("ACL", "LOG") == [], "a command of chatd was refused"


class TokenRecordingProxy:
    """Forwards to Chroma and records the token header of every request."""

    def __init__(self, upstream: str) -> None:
        self.seen: "list[tuple[str, str, str]]" = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def forward(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.seen.append((self.path, self.headers.get("Authorization", ""),
                                   self.headers.get("X-Chroma-Token", "")))
                request = urllib.request.Request(upstream + self.path, data=body, method=self.command,
                                                 headers={"Content-Type": "application/json"})
                try:
                    with urllib.request.urlopen(request, timeout=10) as response:
                        status, data = response.status, response.read()
                except urllib.error.HTTPError as error:
                    status, data = error.code, error.read()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = forward

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.parametrize("header", ["Authorization", "X-Chroma-Token"])
def test_chroma_without_credentials_token_is_sent_and_collections_live_in_the_configured_tenant_and_database(
        stack, make_redis, new_pool, unique, tmp_path, header):
    tenant, database = unique("tenant"), unique("db")
    # The operator creates them (docs/deployment.md).
    assert http_json(f"{stack.chroma_url}/api/v2/tenants", "POST", {"name": tenant})[0] == 200
    assert http_json(f"{stack.chroma_url}/api/v2/tenants/{tenant}/databases", "POST", {"name": database})[0] == 200
    token = unique("tok")
    proxy = TokenRecordingProxy(stack.chroma_url)
    try:
        # A Redis of its own: the indexers of every pool on a shared Redis form
        # one group, and another pool's would write this user's turns elsewhere.
        redis = make_redis()
        front = new_pool({"CHATD_REDIS_PORT": str(redis.port),
                          "CHATD_CHROMA_URL": proxy.url, "CHATD_CHROMA_TENANT": tenant,
                          "CHATD_CHROMA_DATABASE": database, "CHATD_CHROMA_TOKEN_HEADER": header,
                          "CHATD_CHROMA_TOKEN_FILE": secret_file(tmp_path, "chroma-token", token)})
        user = unique("tenant-user")
        chat_ok(front.url, user, unique("remember me"))
        shard = shard_name(shard_of(user))

        def records_in(tenant_name, database_name):
            base = f"{stack.chroma_url}/api/v2/tenants/{tenant_name}/databases/{database_name}/collections"
            status, coll = http_json(f"{base}/{shard}")
            if status != 200:
                return 0
            status, got = http_json(f"{base}/{coll['id']}/get", "POST", {"where": {"user": user}, "include": []})
            return len(got["ids"]) if status == 200 else 0

        assert poll_until(lambda: records_in(tenant, database) == 2, INDEX_TIMEOUT_S), "no records in the tenant"
        assert records_in("default_tenant", "default_database") == 0
        assert proxy.seen
        expected = (f"Bearer {token}", "") if header == "Authorization" else ("", token)
        assert all((auth, chroma) == expected for _, auth, chroma in proxy.seen), proxy.seen[:3]
        assert token not in front.pool.log_text()
    finally:
        proxy.stop()
