"""A user's own data over the API (issue 15, docs/api.md) against the real
stack, in each mode of access control: GET /api/history, GET /api/export,
DELETE /api/memory, the erase fence (a chat in flight during the erase keeps
nothing), the automatic restore of an archived user, and the rate limit of the
data endpoints, apart from the chat's.

The module's pools share a Redis of their own, so that counting "every other
user's data" before and after an erase counts a known world, and an archive
directory of their own.
"""

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
import urllib.parse
from pathlib import Path

import pytest

from harness.chroma_layout import legacy_collection_name, user_records
from harness import keys as rkeys
from harness.stack import Redis, http_request, json_log_records, poll_until, post_chat, redis_now_ms
from harness.windows import in_one_fixed_window

MODES = ("off", "service", "jwt")
ISSUER = "https://idp.test.example"
AUDIENCE = "chatd-user-data-tests"
TOKEN_TTL_S = 600
INDEX_TIMEOUT_S = 45
FAKE_TIMEOUT_S = 20
CLEANUP_TIMEOUT_S = 180
INACTIVE_S = 3600
FAR_FUTURE_MS = 30 * 24 * 3600 * 1000
HIGH_LIMIT = "1000"
# CHATD_DATA_RATE_WINDOW_S default (include/chatd/config.h).
DATA_WINDOW_S = 60
# A chat held by the fake model this long is in flight while the test erases.
SLOW_CHAT_MS = 4000
EXCERPT_PREAMBLE = "Quoted earlier conversation with this user"
# What an API erase leaves of a user in Redis: no message, only the erase's
# tombstone (it fences chats that started before it, and expires) and the
# rate counters (not memory; they expire by themselves, and erasing them would
# reset the user's quota).
ALLOWED_AFTER_ERASE = {"erased", "rl:fixed", "rl:sliding", "rl:data", "inflight"}


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Client:
    """Speaks to one pool in its mode: off (userId trusted), service (a
    service token), jwt (an HS256 token whose subject is the user)."""

    def __init__(self, mode: str, frontend, secret: bytes = b"", service_token: str = ""):
        self.mode = mode
        self.frontend = frontend
        self.secret = secret
        self.service_token = service_token

    @property
    def url(self) -> str:
        return self.frontend.url

    def token(self, sub: str) -> str:
        now = int(time.time())
        header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64url(json.dumps({"sub": sub, "iat": now, "exp": now + TOKEN_TTL_S, "iss": ISSUER,
                                     "aud": AUDIENCE}).encode())
        signing_input = f"{header}.{payload}".encode()
        return f"{header}.{payload}.{b64url(hmac.new(self.secret, signing_input, hashlib.sha256).digest())}"

    def headers(self, user: str) -> "dict[str, str]":
        if self.mode == "service":
            return {"Authorization": f"Bearer {self.service_token}"}
        if self.mode == "jwt":
            return {"Authorization": f"Bearer {self.token(user)}"}
        return {}

    def chat(self, user: str, message: str):
        return post_chat(self.url, user, message, headers=self.headers(user), timeout=60)

    def chat_ok(self, user: str, message: str) -> dict:
        status, _, body = self.chat(user, message)
        assert status == 200, f"{user}: {status} {body!r}"
        return body

    def data(self, method: str, path: str, user: str, as_user=None, send_user=True, **params):
        """A data request about `user`; in jwt mode the token speaks for
        `as_user` (default: the user)."""
        query = dict(params)
        if send_user:
            query["userId"] = user
        headers = self.headers(as_user or user)
        return http_request(self.url, method, f"{path}?{urllib.parse.urlencode(query)}", headers=headers,
                            timeout=60)

    def history(self, user: str, **params) -> dict:
        status, _, body = self.data("GET", "/api/history", user, **params)
        assert status == 200, f"{status} {body!r}"
        return body

    def all_history(self, user: str, limit: int) -> "list[dict]":
        """Every page, newest page first, put back in time order."""
        pages, before = [], None
        while True:
            params = {"limit": limit} if before is None else {"limit": limit, "before": before}
            page = self.history(user, **params)
            assert len(page["messages"]) <= limit
            pages.append(page["messages"])
            before = page["next"]
            if before is None:
                break
        return [m for page in reversed(pages) for m in page]

    def erase(self, user: str) -> dict:
        status, _, body = self.data("DELETE", "/api/memory", user)
        assert status == 200, f"{status} {body!r}"
        return body


class World:
    def __init__(self, stack, redis: Redis, archive_root: Path, clients, build_dir: Path):
        self.stack = stack
        self.redis = redis
        self.archive_root = archive_root
        self.clients = clients
        self.build_dir = build_dir

    def user_keys(self, user: str) -> "list[str]":
        keys, cursor = [], b"0"
        while True:
            cursor, batch = self.redis.command("SCAN", cursor, "MATCH", rkeys.user_key_pattern(user), "COUNT", 1000)
            keys.extend(k.decode() for k in batch)
            if cursor == b"0":
                return sorted(keys)

    def stream_turns(self, user: str) -> "list[str]":
        turns = []
        for _, fields in self.redis.command("XRANGE", rkeys.index_stream_of(user), "-", "+"):
            values = dict(zip(fields[0::2], fields[1::2]))
            if values.get(b"user", b"").decode() == user:
                turns.append(values[b"turn"].decode())
        return turns

    def wait_indexed(self, user: str, records: int) -> None:
        def done():
            return len(user_records(self.stack.chroma_url, user)) == records and not self.stream_turns(user)
        assert poll_until(done, INDEX_TIMEOUT_S), f"{user}: not indexed within {INDEX_TIMEOUT_S} s"

    def snapshot(self, user: str) -> dict:
        """Everything chatd holds of a user: Redis keys with their content,
        activity, stream entries, Chroma records, archive files."""
        keys = {}
        for key in self.user_keys(user):
            if key.endswith(":rl:data") or key.endswith(":rl:fixed"):
                continue  # counters move with every request, and are not memory
            keys[key] = self.redis.command("DUMP", key)
        archive = self.archive_root / legacy_collection_name(user)
        files = {p.name: p.read_bytes() for p in sorted(archive.iterdir())} if archive.exists() else {}
        return {"keys": keys, "activity": self.redis.command("ZSCORE", rkeys.activity_of(user), user),
                "stream": self.stream_turns(user),
                "chroma": sorted(json.dumps(r, sort_keys=True) for r in user_records(self.stack.chroma_url, user)),
                "archive": files}

    def cleanup(self, *args: str, now_ms=None):
        import os
        import subprocess
        env = {k: v for k, v in self.stack.pool_env(threads=1, overrides={
            "CHATD_REDIS_PORT": str(self.redis.port), "CHATD_ARCHIVE_DIR": str(self.archive_root),
            "CHATD_CLEANUP_INACTIVE_S": str(INACTIVE_S),
            "CHATD_CLEANUP_NOW_MS": str(now_ms) if now_ms else None}).items() if v is not None}
        env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
        done = subprocess.run([str(self.build_dir / "bin" / "chatd-cleanup"), *args], env=env, capture_output=True,
                              text=True, timeout=CLEANUP_TIMEOUT_S)
        return done.returncode, json_log_records(done.stderr), done.stderr


def pool_env(redis: Redis, archive_root: Path, extra=None) -> "dict[str, str]":
    env = {"CHATD_REDIS_PORT": str(redis.port), "CHATD_ARCHIVE_DIR": str(archive_root),
           "CHATD_RATE_LIMIT": HIGH_LIMIT, "CHATD_DATA_RATE_LIMIT": HIGH_LIMIT,
           "CHATD_CHROMA_TIMEOUT_MS": "10000"}
    env.update(extra or {})
    return env


def make_clients(stack, redis: Redis, archive_root: Path, folder: Path, extra=None) -> "dict[str, Client]":
    secret = secrets.token_urlsafe(48).encode()
    secret_file = folder / "jwt-secret"
    secret_file.write_bytes(secret + b"\n")
    secret_file.chmod(0o600)
    service_token = secrets.token_hex(32)
    tokens_file = folder / "service-tokens"
    tokens_file.write_text(service_token + "\n")
    tokens_file.chmod(0o600)
    modes = {
        "off": {},
        "service": {"CHATD_AUTH_MODE": "service", "CHATD_SERVICE_TOKENS_FILE": str(tokens_file)},
        "jwt": {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "HS256", "CHATD_JWT_SECRET_FILE": str(secret_file),
                "CHATD_JWT_ISSUER": ISSUER, "CHATD_JWT_AUDIENCE": AUDIENCE},
    }
    clients = {}
    for mode, overrides in modes.items():
        env = pool_env(redis, archive_root, {**overrides, **(extra or {})})
        clients[mode] = Client(mode, stack.new_pool(env, workers=1, threads=4), secret, service_token)
    return clients


@pytest.fixture(scope="module")
def world(stack, build_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("user-data")
    redis = Redis(folder / "redis").start()
    archive_root = folder / "archive"
    clients = {}
    try:
        clients = make_clients(stack, redis, archive_root, folder)
        yield World(stack, redis, archive_root, clients, build_dir)
    finally:
        for client in clients.values():
            client.frontend.stop()
        redis.stop()


def recorded_prompt(fake, marker: str) -> "list[dict]":
    requests = fake.requests(marker)
    assert requests, f"the model never saw {marker!r}"
    return requests[-1]["messages"]


# --------------------------------------------------------------------------
# History and export


@pytest.mark.parametrize("mode", MODES)
def test_history_holds_every_message_in_order_and_pages_return_each_once(world, unique, mode):
    client = world.clients[mode]
    user = unique(f"hist-{mode}")
    said = [f"message {i} {unique('m')}" for i in range(6)]
    replies = [client.chat_ok(user, m) for m in said]

    history = client.history(user)
    assert history["next"] is None
    messages = history["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        pair for m, r in zip(said, replies) for pair in (("user", m), ("assistant", r["response"]))]
    assert [m["turnId"] for m in messages] == [r["turnId"] for r in replies for _ in range(2)]
    assert all(m["at"].endswith("Z") for m in messages)

    # Pages of every size, odd ones included: every message exactly once.
    for limit in (1, 3, 5, 12):
        assert client.all_history(user, limit) == messages, f"limit {limit}"
    newest = client.history(user, limit=3)
    assert newest["messages"] == messages[-3:] and newest["next"] is not None

    status, headers, body = client.data("GET", "/api/export", user)
    assert status == 200, body
    assert headers["content-disposition"].startswith("attachment")
    assert body["userId"] == user and body["messages"] == messages
    assert body["activity"]["lastActiveAt"] is not None
    assert body["archive"]["archived"] is False


@pytest.mark.parametrize("mode", MODES)
def test_history_reads_indexed_turns_from_long_term_memory(world, unique, mode):
    """Past the recent list and the hot set, the messages come from Chroma."""
    client = world.clients[mode]
    user = unique(f"long-{mode}")
    said = [f"older {i} {unique('m')}" for i in range(3)]
    for m in said:
        client.chat_ok(user, m)
    world.wait_indexed(user, 6)
    # Only Chroma holds the oldest turns now (the recent list keeps 4
    # messages): drop the hot set to make the history read them from Chroma.
    world.redis.command("DEL", rkeys.user_key(user, "hot"), rkeys.user_key(user, "hotidx"))
    assert [m["content"] for m in client.history(user)["messages"] if m["role"] == "user"] == said


def test_migrate_indexes_the_turns_recorded_before_the_turn_index(world, unique):
    """A deployment upgraded to the history has users whose older turns are in
    Chroma but not in their turn index: `chatd-cleanup migrate` adds them."""
    client = world.clients["off"]
    user = unique("upgraded")
    said = [f"before the upgrade {i} {unique('m')}" for i in range(3)]
    for m in said:
        client.chat_ok(user, m)
    world.wait_indexed(user, 6)
    world.redis.command("DEL", rkeys.user_key(user, "turns"))  # as recorded by the version before
    later = f"after the upgrade {unique('m')}"
    client.chat_ok(user, later)
    assert [m["content"] for m in client.history(user)["messages"] if m["role"] == "user"] == [later]

    code, events, stderr = world.cleanup("migrate")
    assert code == 0, stderr[-3000:]
    assert events[-1]["turn_indexes"] >= 1
    assert [m["content"] for m in client.history(user)["messages"] if m["role"] == "user"] == said + [later]


def test_bad_history_requests_get_json_errors(world, unique):
    client = world.clients["off"]
    user = unique("bad")
    for params, code in (({"limit": 0}, "invalid_limit"), ({"limit": 201}, "invalid_limit"),
                         ({"limit": "x"}, "invalid_limit"), ({"before": "nonsense"}, "invalid_cursor")):
        status, _, body = client.data("GET", "/api/history", user, **params)
        assert (status, body["code"]) == (400, code), (params, body)
    status, _, body = client.data("GET", "/api/history", user, send_user=False)
    assert (status, body["code"]) == (400, "missing_field")
    status, _, body = client.data("GET", "/api/history", "bad{user}")
    assert (status, body["code"]) == (400, "invalid_user_id")
    status, headers, body = client.data("POST", "/api/history", user)
    assert (status, body["code"]) == (405, "method_not_allowed") and headers["allow"] == "GET"
    status, headers, body = client.data("GET", "/api/memory", user)
    assert (status, body["code"]) == (405, "method_not_allowed") and headers["allow"] == "DELETE"


def test_service_mode_requires_the_service_token_and_a_user(world, unique):
    client = world.clients["service"]
    user = unique("svc")
    status, _, body = http_request(client.url, "GET", f"/api/history?userId={user}")
    assert (status, body["code"]) == (401, "missing_token")
    status, _, body = client.data("GET", "/api/history", user, send_user=False)
    assert (status, body["code"]) == (400, "missing_field")


def test_jwt_mode_refuses_another_users_id(world, unique):
    client = world.clients["jwt"]
    owner, intruder = unique("owner"), unique("intruder")
    client.chat_ok(owner, f"private {unique('m')}")
    for method, path in (("GET", "/api/history"), ("GET", "/api/export"), ("DELETE", "/api/memory")):
        status, _, body = client.data(method, path, owner, as_user=intruder)
        assert (status, body["code"]) == (403, "user_mismatch"), (path, body)
    # The subject alone names the user.
    status, _, body = client.data("GET", "/api/history", owner, send_user=False)
    assert status == 200 and len(body["messages"]) == 2
    assert len(client.history(owner)["messages"]) == 2, "the refused delete erased something"


# --------------------------------------------------------------------------
# Erase


@pytest.mark.parametrize("mode", MODES)
def test_delete_erases_the_user_everywhere_and_nobody_else(world, stack, unique, mode):
    client = world.clients[mode]
    user = unique(f"erase-{mode}")
    others = [unique(f"other-{mode}") for _ in range(3)]
    old = [f"secret {i} {unique('m')}" for i in range(3)]
    for m in old:
        client.chat_ok(user, m)
    for other in others:
        client.chat_ok(other, f"bystander {unique('m')}")
    world.wait_indexed(user, 6)
    for other in others:
        world.wait_indexed(other, 2)
    # A queued turn too: written after the wait, maybe not yet indexed.
    old.append(f"secret last {unique('m')}")
    client.chat_ok(user, old[-1])
    # A bystander with an archive of their own.
    archive = world.archive_root / legacy_collection_name(others[0])
    archive.mkdir(parents=True, exist_ok=True)
    (archive / "1.json").write_text(json.dumps({
        "format": "chatd-archive/1", "user": others[0], "collection": legacy_collection_name(others[0]),
        "last_activity_ms": 1, "archived_at_ms": 2, "records": []}))
    before = {other: world.snapshot(other) for other in others}

    assert client.erase(user) == {"deleted": {"messages": 8}}

    assert client.history(user) == {"messages": [], "next": None}
    assert {k.split(f":u:{user}:", 1)[1] for k in world.user_keys(user)} <= ALLOWED_AFTER_ERASE
    assert world.redis.command("ZSCORE", rkeys.activity_of(user), user) is None
    assert world.stream_turns(user) == []
    assert user_records(stack.chroma_url, user) == []
    assert not (world.archive_root / legacy_collection_name(user)).exists()
    # Nothing of anybody else moved.
    assert {other: world.snapshot(other) for other in others} == before
    # Idempotent.
    assert client.erase(user) == {"deleted": {"messages": 0}}

    # The next chat is a new user's: its prompt holds nothing of before.
    question = f"what did I tell you? {unique('m')}"
    client.chat_ok(user, question)
    prompt = recorded_prompt(stack.fake, question)
    assert [m for m in prompt if m["role"] != "system"] == [{"role": "user", "content": question}]
    world.wait_indexed(user, 2)
    assert [m["content"] for m in client.history(user)["messages"]][0] == question


def test_a_delete_erases_the_answers_kept_for_idempotency_keys(world, stack, unique):
    # A kept answer holds the reply text: it is the user's data like the rest,
    # and a retry after the erase must not bring it back.
    client = world.clients["off"]
    user, key = unique("erase-idem"), unique("key")
    message = f"remember my keyed secret {unique('m')}"
    status, _, first = post_chat(client.url, user, message, headers={"Idempotency-Key": key}, timeout=60)
    assert status == 200, first
    replay = post_chat(client.url, user, message, headers={"Idempotency-Key": key}, timeout=60)
    assert replay[1].get("idempotent-replayed") == "true"  # kept before the erase
    assert any(":idem" in k for k in world.user_keys(user))

    assert client.erase(user)["deleted"]["messages"] >= 2

    assert not [k for k in world.user_keys(user) if ":idem" in k]
    calls = len(stack.fake.requests(message))
    status, headers, again = post_chat(client.url, user, message, headers={"Idempotency-Key": key}, timeout=60)
    assert status == 200, again
    assert "idempotent-replayed" not in headers and again["turnId"] != first["turnId"]
    assert len(stack.fake.requests(message)) == calls + 1  # the model answered anew


@pytest.mark.parametrize("mode", MODES)
def test_a_delete_during_a_slow_chat_leaves_nothing_behind(world, stack, unique, mode):
    client = world.clients[mode]
    user = unique(f"fence-{mode}")
    client.chat_ok(user, f"before {unique('m')}")
    slow = f"slow {unique('m')} #fake:delay_ms={SLOW_CHAT_MS}"
    answer = {}
    thread = threading.Thread(target=lambda: answer.update(result=client.chat(user, slow)))
    thread.start()
    try:
        assert poll_until(lambda: stack.fake.requests(slow), FAKE_TIMEOUT_S), "the slow chat never reached the model"
        assert client.erase(user)["deleted"]["messages"] == 2
    finally:
        thread.join(timeout=60)
    status, _, body = answer["result"]
    assert (status, body["code"]) == (409, "memory_erased"), body
    assert client.history(user) == {"messages": [], "next": None}
    assert world.stream_turns(user) == []
    assert {k.split(f":u:{user}:", 1)[1] for k in world.user_keys(user)} <= ALLOWED_AFTER_ERASE
    # A new chat works and remembers nothing of the slow one, and once it is
    # indexed Chroma holds it alone.
    question = f"anything? {unique('m')}"
    client.chat_ok(user, question)
    prompt = recorded_prompt(stack.fake, question)
    assert not any("slow" in m["content"] or "before" in m["content"] for m in prompt if m["role"] != "system")
    world.wait_indexed(user, 2)
    assert all(question in r["document"] or "last_user=" + question in r["document"]
               for r in user_records(stack.chroma_url, user))


# --------------------------------------------------------------------------
# Automatic restore


@pytest.mark.parametrize("mode", MODES)
def test_an_archived_users_next_chat_recalls_what_they_said_before(stack, build_dir, tmp_path, unique, mode):
    # Its own Redis: the cleanup archives every user inactive in it.
    redis = Redis(tmp_path / "redis").start()
    clients = {}
    try:
        archive_root = tmp_path / "archive"
        clients = make_clients(stack, redis, archive_root, tmp_path)
        world = World(stack, redis, archive_root, clients, build_dir)
        client = clients[mode]
        user = unique(f"back-{mode}")
        dog = f"my dog is called Rex{unique('d')}"
        client.chat_ok(user, dog)
        world.wait_indexed(user, 2)
        code, events, stderr = world.cleanup(now_ms=redis_now_ms(world.redis) + FAR_FUTURE_MS)
        assert code == 0, stderr[-3000:]
        assert events[-1]["archived"] == 1
        assert (archive_root / legacy_collection_name(user)).exists()
        assert user_records(stack.chroma_url, user) == []

        question = f"What is my dog called? {unique('m')}"
        client.chat_ok(user, question)
        prompt = recorded_prompt(stack.fake, question)
        quoted = [m["content"] for m in prompt if m["content"].startswith(EXCERPT_PREAMBLE)]
        assert quoted and dog in quoted[0], prompt
        assert not (archive_root / legacy_collection_name(user)).exists(), "the archive stays after the restore"
        restores = [r for r in client.frontend.pool.log_records() if r.get("event") == "auto_restore"]
        assert restores and restores[0]["records"] == 2
        # What the first reply waited for its memory (docs/api.md quotes it); shown with -s.
        print(f"\nauto_restore [{mode}]: {restores[0]['records']} records in {restores[0]['ms']:.1f} ms")
        history = [m["content"] for m in client.history(user)["messages"]]
        assert history[0] == dog and history[2] == question
    finally:
        for client in clients.values():
            client.frontend.stop()
        redis.stop()


# --------------------------------------------------------------------------
# Rate limit


def test_the_data_endpoints_have_a_rate_limit_of_their_own(stack, tmp_path, unique):
    redis = Redis(tmp_path / "redis").start()
    frontend = None
    try:
        # The chat limit on the sliding log, which has no window boundary to
        # give the quota back mid-test; the data limit always counts in fixed
        # windows, so its part runs in one.
        frontend = stack.new_pool(pool_env(redis, tmp_path / "archive",
                                           {"CHATD_DATA_RATE_LIMIT": "3", "CHATD_RATE_LIMIT": "2",
                                            "CHATD_RATE_ALGORITHM": "sliding"}),
                                  workers=1, threads=2)
        client = Client("off", frontend)

        def attempt():
            user = unique("limits")
            for _ in range(2):
                client.chat_ok(user, f"hi {unique('m')}")
            chat_refused = client.chat(user, f"one too many {unique('m')}")
            # The chat quota is spent; the data quota is whole.
            reads = [client.data("GET", "/api/history", user) for _ in range(4)]
            return chat_refused, reads, client.data("DELETE", "/api/memory", user)

        chat_refused, reads, erase = in_one_fixed_window(redis, DATA_WINDOW_S, attempt)
        status, _, body = chat_refused
        assert (status, body["code"]) == (429, "rate_limited")
        for status, _, body in reads[:3]:
            assert status == 200 and len(body["messages"]) == 4
        status, headers, body = reads[3]
        assert (status, body["code"]) == (429, "rate_limited")
        assert int(headers["retry-after"]) >= 1 and body["retryAfter"] >= 1
        status, _, body = erase
        assert (status, body["code"]) == (429, "rate_limited"), "the erase counts against the data limit too"
    finally:
        if frontend is not None:
            frontend.stop()
        redis.stop()
