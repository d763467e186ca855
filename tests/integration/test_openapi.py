"""docs/openapi.yaml against the real responses: every documented status that a
test can provoke is provoked, and the body (and documented headers) must match
the schema for that status. A small validator for the subset of JSON Schema the
file uses (type, required, properties, enum, pattern, minimum, minLength,
additionalProperties, $ref)."""

import concurrent.futures
import json
import re

import pytest
import yaml

from harness.redis_proxy import RedisProxy
from harness import keys as rkeys
from harness.stack import REPO_ROOT, concurrently, http_request, poll_until, post_chat
from harness.windows import in_one_fixed_window

SPEC = yaml.safe_load((REPO_ROOT / "docs/openapi.yaml").read_text())
# CHATD_DATA_RATE_WINDOW_S default (include/chatd/config.h).
DATA_WINDOW_S = 60


def resolve(node):
    while isinstance(node, dict) and "$ref" in node:
        path = node["$ref"].lstrip("#/").split("/")
        node = SPEC
        for part in path:
            node = node[part]
    return node


def validate(value, schema, where="body"):
    schema = resolve(schema)
    if value is None and schema.get("nullable"):
        return
    kind = schema.get("type")
    if kind == "object":
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        for name in schema.get("required", []):
            assert name in value, f"{where}: missing {name}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for name, item in value.items():
            if name in props:
                validate(item, props[name], f"{where}.{name}")
            elif isinstance(extra, dict):
                validate(item, extra, f"{where}.{name}")
    elif kind == "string":
        assert isinstance(value, str), f"{where}: {value!r} is not a string"
        if "minLength" in schema:
            assert len(value) >= schema["minLength"], where
        if "pattern" in schema:
            assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    elif kind == "array":
        assert isinstance(value, list), f"{where}: {value!r} is not an array"
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{where}[{i}]")
    elif kind == "boolean":
        assert isinstance(value, bool), f"{where}: {value!r} is not a boolean"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
        if "minimum" in schema:
            assert value >= schema["minimum"], where
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"


def check_events(body, events_spec):
    """A text/event-stream body: every event's data matches one of the schemas
    documented for its event type."""
    for block in (b for b in body.split("\n\n") if b.strip()):
        kind, data = "message", []
        for line in block.split("\n"):
            field, _, value = line.partition(":")
            if field == "event":
                kind = value.strip()
            elif field == "data":
                data.append(value[1:] if value.startswith(" ") else value)
        assert kind in events_spec, f"event type {kind} is not documented"
        doc = json.loads("\n".join(data))
        failures = []
        for schema in events_spec[kind]:
            try:
                validate(doc, schema, f"event {kind}")
                break
            except AssertionError as exc:
                failures.append(str(exc))
        else:
            raise AssertionError(f"event {kind} {doc!r} matches no documented schema: {failures}")


def check(path, method, status, headers, body):
    responses = SPEC["paths"][path][method.lower()]["responses"]
    assert str(status) in responses, f"{method} {path} answered {status}, which the spec does not document"
    response = resolve(responses[str(status)])
    content = response["content"]
    if headers.get("content-type", "").startswith("text/event-stream"):
        assert "text/event-stream" in content, f"{status}: a stream is not documented"
        check_events(body, content["text/event-stream"]["x-events"])
    elif "application/json" in content:
        assert headers["content-type"].startswith("application/json")
        validate(body, content["application/json"]["schema"])
    for name, header in response.get("headers", {}).items():
        value = headers.get(name.lower())
        if value is None and resolve(header).get("required") is False:
            continue  # documented as sometimes present
        assert value is not None, f"{status}: header {name} missing"
        schema = resolve(resolve(header)["schema"])
        validate(int(value) if schema.get("type") == "integer" else value, schema, f"header {name}")


def test_documented_chat_responses_match_the_spec(stack, new_pool, unique):
    user = unique("openapi")
    cases = [
        (200, post_chat(stack.url, user, "Hello spec")),
        (400, post_chat(stack.url, user, "")),
        (400, post_chat(stack.url, raw_body="{nope")),
        (405, post_chat(stack.url, user, "x", method="GET")),
        (413, post_chat(stack.url, user, "x" * 70000)),
        (415, post_chat(stack.url, user, "x", content_type="text/plain")),
        (502, post_chat(stack.url, user, "#fake:status=400 fails")),
        (200, post_chat(stack.url, user, "Hello stream", headers={"Accept": "text/event-stream"})),
        (200, post_chat(stack.url, user, "Stream breaks #fake:stream_error_after=1",
                        headers={"Accept": "text/event-stream"})),
    ]
    # Counters are shared by every pool on the Redis: a fresh user for a limit of 1.
    # The sliding log: a fixed window ending between the two would admit both.
    limited = new_pool({"CHATD_RATE_LIMIT": "1", "CHATD_RATE_ALGORITHM": "sliding"})
    hurried = unique("openapi-limited")
    first = post_chat(limited.url, hurried, "one")
    assert first[0] == 200
    cases.append((429, post_chat(limited.url, hurried, "two")))
    slow = new_pool({"CHATD_REQUEST_DEADLINE_MS": "1000", "CHATD_LLM_MAX_RETRIES": "0"})
    cases.append((504, post_chat(slow.url, user, "#fake:delay_ms=3000 slow")))
    for expected, (status, headers, body) in cases:
        assert status == expected, body
        check("/api/chat", "POST", status, headers, body)


def test_documented_idempotency_responses_match_the_spec(stack, new_pool, unique):
    user, key = unique("openapi-idem"), unique("key")
    held = f"held {unique('m')} #fake:delay_ms=3000"
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as runner:
        first = runner.submit(post_chat, stack.url, user, held, {"Idempotency-Key": key})
        assert poll_until(lambda: stack.fake.requests(contains=held.split(" #")[0]), timeout=30)
        cases = [(409, post_chat(stack.url, user, held, {"Idempotency-Key": key}))]
        assert first.result()[0] == 200
    cases.append((422, post_chat(stack.url, user, "another message", {"Idempotency-Key": key})))
    # A replay: the first answer, marked, without fresh rate-limit figures.
    status, headers, body = post_chat(stack.url, user, held, {"Idempotency-Key": key})
    assert status == 200 and headers.get("idempotent-replayed") == "true"
    ok = SPEC["paths"]["/api/chat"]["post"]["responses"]["200"]
    validate(body, ok["content"]["application/json"]["schema"])
    validate(headers["idempotent-replayed"], ok["headers"]["Idempotent-Replayed"]["schema"])
    # Redis's answer to the record script lost twice: the turn's outcome is unknown.
    with RedisProxy(stack.redis.host, stack.redis.port) as proxy:
        front = new_pool({"CHATD_REDIS_PORT": str(proxy.port)})
        assert post_chat(front.url, user, "Redis learns the record script")[0] == 200
        proxy.hold(rkeys.user_key(user, "recorded").encode(), count=2)
        cases.append((503, post_chat(front.url, user, "lost answer")))
    for expected, (status, headers, body) in cases:
        assert status == expected, body
        check("/api/chat", "POST", status, headers, body)
    unknown = cases[-1][1][2]
    assert unknown["code"] == "record_outcome_unknown" and "turnId" in unknown


def test_documented_user_data_responses_match_the_spec(stack, new_pool, unique):
    user = unique("openapi-data")
    assert post_chat(stack.url, user, "Hello data")[0] == 200
    cases = [
        ("/api/history", "GET", 200, f"/api/history?userId={user}&limit=1"),
        ("/api/history", "GET", 400, f"/api/history?userId={user}&limit=0"),
        ("/api/history", "GET", 400, "/api/history"),
        ("/api/history", "GET", 405, f"/api/history?userId={user}", "DELETE"),
        ("/api/export", "GET", 200, f"/api/export?userId={user}"),
        ("/api/memory", "DELETE", 405, f"/api/memory?userId={user}", "GET"),
        ("/api/memory", "DELETE", 200, f"/api/memory?userId={user}"),
    ]
    for path, method, expected, target, *sent in cases:
        status, headers, body = http_request(stack.url, sent[0] if sent else method, target)
        assert status == expected, (target, body)
        check(path, method, status, headers, body)
    limited = new_pool({"CHATD_DATA_RATE_LIMIT": "1"})

    def twice():
        hurried = unique("openapi-data-limited")
        first = http_request(limited.url, "GET", f"/api/history?userId={hurried}")
        return first, http_request(limited.url, "GET", f"/api/history?userId={hurried}")

    # The data limit counts in fixed windows: both requests in one.
    first, (status, headers, body) = in_one_fixed_window(stack.redis, DATA_WINDOW_S, twice)
    assert first[0] == 200, first
    assert status == 429, body
    check("/api/history", "GET", status, headers, body)


def test_documented_health_and_metrics_match_the_spec(stack):
    status, headers, body = http_request(stack.url, "GET", "/api/health")
    check("/api/health", "GET", status, headers, body)
    status, headers, body = http_request(stack.url, "GET", "/metrics")
    assert status == 200 and "chatd_requests_total" in body
    assert "/metrics" in SPEC["paths"]


def test_every_error_code_in_the_api_doc_is_real():
    # docs/api.md lists the codes; each must appear in the sources or the site.
    doc = (REPO_ROOT / "docs/api.md").read_text()
    codes = set(re.findall(r"^\| `([a-z_]+)` \|", doc, re.M))
    assert len(codes) > 15
    sources = "".join(p.read_text() for p in (REPO_ROOT / "src").glob("*.cc"))
    sources += (REPO_ROOT / "nginx/chatd-site.conf.in").read_text()
    missing = {c for c in codes if f'"{c}"' not in sources and f'"code":"{c}"' not in sources}
    assert missing == set()
