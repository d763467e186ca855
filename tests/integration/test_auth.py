"""Access control through the real stack (docs/auth.md): service tokens and
JWT user tokens (HS256, RS256, ES256) against pools started with those modes.

Tokens are minted here with the standard library (HS256) and the `openssl`
command line (RS256, ES256), with keys generated for this module only. Every
token minted is remembered, and no log of the pools may contain any of them,
nor the HS256 secret or a service token.
"""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import secrets
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from harness.chroma_layout import user_records
from harness.stack import REPO_ROOT, json_log_records, poll_until, post_chat

ISSUER = "https://idp.test.example"
AUDIENCE = "chatd-tests"
TOKEN_TTL_S = 600
LOG_TIMEOUT_S = 10
INDEX_TIMEOUT_S = 30
START_REFUSAL_TIMEOUT_S = 20
DEFAULT_RATE_LIMIT = 30  # include/chatd/config.h
FLOOD_SIZE = 2 * DEFAULT_RATE_LIMIT  # far beyond a quota, if refusals spent one
RATELIMIT_RE = re.compile(r'^"default";r=(\d+);t=(\d+)$')

# Everything secret this module creates: none of it may reach a log.
MINTED_TOKENS: "list[str]" = []
SECRETS: "list[str]" = []


# --------------------------------------------------------------------------
# Minting tokens


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def der_to_raw(der: bytes, size: int = 32) -> bytes:
    """OpenSSL's DER ECDSA signature -> JOSE's r||s (RFC 7518 section 3.4)."""
    def length(i):
        first = der[i]
        if first < 0x80:
            return first, i + 1
        n = first & 0x7F
        return int.from_bytes(der[i + 1:i + 1 + n], "big"), i + 1 + n

    assert der[0] == 0x30, der
    _, i = length(1)
    raw = b""
    for _ in range(2):
        assert der[i] == 0x02, der
        n, i = length(i + 1)
        raw += int.from_bytes(der[i:i + n], "big").to_bytes(size, "big")
        i += n
    return raw


def openssl_sign(private_key: Path, data: bytes) -> bytes:
    done = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(private_key)], input=data,
                          capture_output=True, check=True, timeout=30)
    return done.stdout


class Minter:
    """Signs JWTs like an identity provider would: HS256 with a shared
    secret, RS256/ES256 with a private key."""

    def __init__(self, alg, secret=None, private_key=None, issuer=None, audience=None):
        self.alg = alg
        self.secret = secret
        self.private_key = private_key
        self.issuer = issuer
        self.audience = audience

    def sign(self, signing_input: bytes, alg: str) -> bytes:
        if alg == "HS256":
            return hmac.new(self.secret, signing_input, hashlib.sha256).digest()
        if alg == "RS256":
            return openssl_sign(self.private_key, signing_input)
        if alg == "ES256":
            return der_to_raw(openssl_sign(self.private_key, signing_input))
        if alg == "ES256-DER":
            return openssl_sign(self.private_key, signing_input)
        if alg == "none":
            return b""
        raise ValueError(alg)

    def claims(self, sub, **overrides):
        now = int(time.time())
        claims = {"iat": now, "exp": now + TOKEN_TTL_S}
        if sub is not None:  # None: a token without a subject
            claims["sub"] = sub
        if self.issuer:
            claims["iss"] = self.issuer
        if self.audience:
            claims["aud"] = self.audience
        for name, value in overrides.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def token(self, sub="nobody", header_alg=None, sign_as=None, raw_header=None, raw_payload=None,
              **claim_overrides) -> str:
        """A signed token; header_alg is what the header claims, sign_as how it
        is really signed (both default to the minter's algorithm)."""
        header_alg = header_alg or self.alg
        header = raw_header if raw_header is not None else json.dumps({"alg": header_alg, "typ": "JWT"})
        payload = raw_payload if raw_payload is not None else json.dumps(self.claims(sub, **claim_overrides))
        signing_input = f"{b64url(header.encode())}.{b64url(payload.encode())}"
        signature = self.sign(signing_input.encode("ascii"), sign_as or header_alg)
        token = f"{signing_input}.{b64url(signature)}"
        MINTED_TOKENS.append(token)
        return token


def bearer(token: str) -> "dict[str, str]":
    return {"Authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------
# Keys, secrets and pools: one set for the whole module


def write_private(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def make_key_pair(folder: Path, name: str, genpkey_args) -> "tuple[Path, Path]":
    private = folder / f"{name}.key"
    public = folder / f"{name}.pub.pem"
    subprocess.run(["openssl", "genpkey", *genpkey_args, "-out", str(private)], check=True,
                   capture_output=True, timeout=60)
    private.chmod(0o600)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)], check=True,
                   capture_output=True, timeout=60)
    public.chmod(0o600)
    return private, public


RSA_ARGS = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
EC_ARGS = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]


class Env:
    """What the tests need to know about the module's pools."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.hs_secret = secrets.token_urlsafe(48).encode()
        SECRETS.append(self.hs_secret.decode())
        self.service_tokens = [secrets.token_hex(32), secrets.token_urlsafe(40)]
        SECRETS.extend(self.service_tokens)
        self.rsa_key, self.rsa_pub = make_key_pair(folder, "rsa", RSA_ARGS)
        self.rsa_other_key, _ = make_key_pair(folder, "rsa-other", RSA_ARGS)
        self.ec_key, self.ec_pub = make_key_pair(folder, "ec", EC_ARGS)
        self.ec_other_key, _ = make_key_pair(folder, "ec-other", EC_ARGS)
        self.hs_secret_file = write_private(folder / "jwt-secret", self.hs_secret + b"\n")
        self.service_tokens_file = write_private(
            folder / "service-tokens", ("# callers of chatd\n" + "\n".join(self.service_tokens) + "\n").encode())
        self.hs = Minter("HS256", secret=self.hs_secret, issuer=ISSUER, audience=AUDIENCE)
        self.rs = Minter("RS256", private_key=self.rsa_key)
        self.es = Minter("ES256", private_key=self.ec_key)
        self.frontends = {}

    def minter(self, alg):
        return {"HS256": self.hs, "RS256": self.rs, "ES256": self.es}[alg]

    def url(self, name):
        return self.frontends[name].url


@pytest.fixture(scope="module")
def auth(stack, tmp_path_factory):
    env = Env(tmp_path_factory.mktemp("auth"))
    pools = {
        "HS256": {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "HS256",
                  "CHATD_JWT_SECRET_FILE": str(env.hs_secret_file),
                  "CHATD_JWT_ISSUER": ISSUER, "CHATD_JWT_AUDIENCE": AUDIENCE},
        "RS256": {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "RS256",
                  "CHATD_JWT_PUBLIC_KEY_FILE": str(env.rsa_pub)},
        "ES256": {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "ES256",
                  "CHATD_JWT_PUBLIC_KEY_FILE": str(env.ec_pub)},
        "service": {"CHATD_AUTH_MODE": "service", "CHATD_SERVICE_TOKENS_FILE": str(env.service_tokens_file)},
    }
    try:
        for name, overrides in pools.items():
            env.frontends[name] = stack.new_pool(overrides, workers=2, threads=4)
        yield env
    finally:
        for frontend in env.frontends.values():
            frontend.stop()


def pool_logs(env: Env) -> str:
    return "".join(f.pool.log_text() + f.nginx.error_log_text() for f in env.frontends.values())


# --------------------------------------------------------------------------
# Assertions


def assert_ok_as(result, message):
    status, headers, body = result
    assert status == 200, f"expected 200, got {status}: {body!r}"
    assert f"last_user={message}" in body["response"], body


def assert_refused(result, status, code, token=None):
    got, headers, body = result
    assert got == status, f"expected {status} {code}, got {got}: {body!r}"
    assert headers.get("content-type", "").startswith("application/json"), headers
    assert isinstance(body, dict) and body.get("code") == code, body
    assert isinstance(body.get("error"), str) and body["error"], body
    if status == 401:
        assert headers.get("www-authenticate", "").startswith("Bearer"), headers
    if token:
        assert token not in json.dumps(body) and token not in json.dumps(headers)


def remaining_quota(headers) -> int:
    match = RATELIMIT_RE.match(headers.get("ratelimit", ""))
    assert match, headers
    return int(match.group(1))


def raw_post(url, path, headers, body: bytes):
    """A POST with headers given as a list, so a name may repeat."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.putrequest("POST", path, skip_accept_encoding=True)
        for name, value in headers + [("Content-Length", str(len(body)))]:
            conn.putheader(name, value)
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        resp_headers = {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()
    text = data.decode("utf-8", errors="replace")
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = text
    return resp.status, resp_headers, parsed


def wait_indexed(stack, user) -> bool:
    """Whether the user's turns reached Chroma in time."""
    return bool(poll_until(lambda: len(user_records(stack.chroma_url, user)), INDEX_TIMEOUT_S, interval=0.2))


# --------------------------------------------------------------------------
# JWT mode: the token decides who speaks


def test_valid_token_speaks_as_its_subject(auth, unique):
    url, user = auth.url("HS256"), unique("alice")
    token = auth.hs.token(user)
    m1, m2 = unique("m"), unique("m")
    assert_ok_as(post_chat(url, message=m1, headers=bearer(token)), m1)  # userId taken from sub
    assert_ok_as(post_chat(url, user, m2, headers=bearer(token)), m2)    # the same, named
    m3 = unique("m")
    assert_ok_as(post_chat(url, message=m3, headers={"Authorization": f"bearer {token}"}), m3)  # any case
    frontend = auth.frontends["HS256"]
    assert poll_until(lambda: len(frontend.pool.request_lines(user)) >= 3, LOG_TIMEOUT_S)


def expired(m, sub):
    return m.token(sub, exp=int(time.time()) - 3600)


# (id, headers builder(minter, sub) -> dict, code). All are 401.
JWT_REFUSALS = [
    ("missing_header", lambda m, s: {}, "missing_token"),
    ("empty_header", lambda m, s: {"Authorization": ""}, "missing_token"),
    ("basic_scheme", lambda m, s: {"Authorization": "Basic YWxpY2U6c2VjcmV0"}, "bad_auth_scheme"),
    ("token_without_scheme", lambda m, s: {"Authorization": m.token(s)}, "bad_auth_scheme"),
    ("expired", lambda m, s: bearer(expired(m, s)), "token_expired"),
    ("no_exp", lambda m, s: bearer(m.token(s, exp=None)), "missing_expiry"),
    ("exp_as_string", lambda m, s: bearer(m.token(s, exp=str(int(time.time()) + 600))), "missing_expiry"),
    ("not_yet_valid", lambda m, s: bearer(m.token(s, nbf=int(time.time()) + 3600)), "token_not_yet_valid"),
    ("wrong_secret", lambda m, s: bearer(Minter("HS256", secret=secrets.token_bytes(48), issuer=ISSUER,
                                                audience=AUDIENCE).token(s)), "bad_signature"),
    ("payload_swapped", lambda m, s: bearer(swap_payload(m.token("someone-else"), m.claims(s))), "bad_signature"),
    ("signature_stripped", lambda m, s: bearer(m.token(s).rsplit(".", 1)[0] + "."), "bad_signature"),
    ("alg_none", lambda m, s: bearer(m.token(s, header_alg="none")), "wrong_algorithm"),
    ("alg_none_signed", lambda m, s: bearer(m.token(s, header_alg="none", sign_as="HS256")), "wrong_algorithm"),
    ("alg_lower_case", lambda m, s: bearer(m.token(s, header_alg="hs256", sign_as="HS256")), "wrong_algorithm"),
    ("alg_hs512_header", lambda m, s: bearer(m.token(s, header_alg="HS512", sign_as="HS256")), "wrong_algorithm"),
    ("alg_missing", lambda m, s: bearer(m.token(s, raw_header='{"typ":"JWT"}', sign_as="HS256")), "wrong_algorithm"),
    ("alg_twice", lambda m, s: bearer(m.token(s, raw_header='{"alg":"none","alg":"HS256"}', sign_as="HS256")),
     "malformed_token"),
    ("wrong_audience", lambda m, s: bearer(m.token(s, aud="another-service")), "wrong_audience"),
    ("audience_list_without_us", lambda m, s: bearer(m.token(s, aud=["a", "b"])), "wrong_audience"),
    ("no_audience", lambda m, s: bearer(m.token(s, aud=None)), "wrong_audience"),
    ("wrong_issuer", lambda m, s: bearer(m.token(s, iss="https://evil.example")), "wrong_issuer"),
    ("no_issuer", lambda m, s: bearer(m.token(s, iss=None)), "wrong_issuer"),
    ("no_subject", lambda m, s: bearer(m.token(None)), "missing_subject"),
    ("subject_not_a_user_id", lambda m, s: bearer(m.token(s + " x")), "invalid_subject"),
    ("subject_not_a_string", lambda m, s: bearer(m.token(42)), "invalid_subject"),
    ("one_segment", lambda m, s: bearer("abcdef"), "malformed_token"),
    ("two_segments", lambda m, s: bearer(m.token(s).rsplit(".", 1)[0]), "malformed_token"),
    ("four_segments", lambda m, s: bearer(m.token(s) + ".abc"), "malformed_token"),
    ("not_base64url", lambda m, s: bearer(m.token(s).replace(".", ".+", 1)), "malformed_token"),
    ("header_not_json", lambda m, s: bearer(m.token(s, raw_header="alg=HS256", sign_as="HS256")), "malformed_token"),
    ("payload_not_json", lambda m, s: bearer(m.token(s, raw_payload="sub=" + s)), "malformed_token"),
    ("two_credentials", lambda m, s: {"Authorization": f"Bearer {m.token(s)}, Bearer {m.token(s)}"},
     "malformed_token"),
    ("token_with_space", lambda m, s: {"Authorization": f"Bearer {m.token(s)} extra"}, "malformed_token"),
]


def swap_payload(token: str, claims: dict) -> str:
    header, _, signature = token.split(".")
    swapped = f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"
    MINTED_TOKENS.append(swapped)
    return swapped


@pytest.mark.parametrize("make_headers,code", [(h, c) for _, h, c in JWT_REFUSALS],
                         ids=[name for name, _, _ in JWT_REFUSALS])
def test_bad_credentials_are_refused_with_401(auth, stack, unique, make_headers, code):
    url, user = auth.url("HS256"), unique("victim")
    headers = make_headers(auth.hs, user)
    token = headers.get("Authorization", "").partition(" ")[2] or None
    marker = unique("m")
    for body_user in (user, None):  # with and without a userId in the body
        kwargs = {"user_id": body_user} if body_user else {}
        assert_refused(post_chat(url, message=marker, headers=headers, **kwargs), 401, code, token)
    # Refused before the model: nothing was asked in the victim's name.
    assert stack.fake.requests(marker) == []


def test_refusal_is_logged_with_its_reason_and_counted(auth, unique):
    frontend, user = auth.frontends["HS256"], unique("victim")
    token = expired(auth.hs, user)

    def failures(reason):
        return [r for r in frontend.pool.log_records() if r.get("event") == "auth_failed" and r.get("reason") == reason]

    before = len(failures("token_expired"))
    assert_refused(post_chat(auth.url("HS256"), user, unique("m"), headers=bearer(token)), 401, "token_expired")
    logged = poll_until(lambda: failures("token_expired")[before:], LOG_TIMEOUT_S)
    assert logged, "no auth_failed line"
    assert logged[0]["mode"] == "jwt" and isinstance(logged[0]["failures"], int)
    # The request line carries the reason too: what the pool's counters count.
    assert poll_until(lambda: [r for r in frontend.pool.log_records()
                               if r.get("event") == "request" and r.get("status") == 401
                               and r.get("error") == "token_expired"], LOG_TIMEOUT_S)


def test_token_of_another_user_is_403(auth, stack, unique):
    alice, bob = unique("alice"), unique("bob")
    marker = unique("m")
    result = post_chat(auth.url("HS256"), bob, marker, headers=bearer(auth.hs.token(alice)))
    assert_refused(result, 403, "user_mismatch")
    assert stack.fake.requests(marker) == []


def test_user_a_cannot_read_or_write_b_memory(auth, stack, unique):
    url = auth.url("HS256")
    alice, bob = unique("alice"), unique("bob")
    token_a, token_b = auth.hs.token(alice), auth.hs.token(bob)
    secret = unique("BOBSECRET")

    # Bob tells a secret; his next prompt carries it (the memory exists), and
    # it reaches his long-term memory too before Alice starts.
    told = f"my locker code is {secret}"
    assert_ok_as(post_chat(url, message=told, headers=bearer(token_b)), told)
    probe = unique("bob-probe")
    assert_ok_as(post_chat(url, message=probe, headers=bearer(token_b)), probe)
    assert secret in json.dumps(stack.fake.requests(probe))
    assert wait_indexed(stack, bob), "Bob's turns never reached Chroma"

    refused_markers, answered_markers = [], []

    def refused(result, marker, statuses=(400, 403)):
        assert result[0] in statuses, result
        refused_markers.append(marker)

    def answered_not_as_bob(result, marker):
        assert_ok_as(result, marker)
        assert secret not in json.dumps(result[2])
        answered_markers.append(marker)

    # 1. Naming Bob in the body, verbatim or in disguise.
    for variant in (bob, bob.upper(), bob.capitalize(), bob + " ", " " + bob, bob + "\u0000", bob + "\n",
                    bob + "\u200b", "bob-" + bob[4:].upper()):
        marker = unique("m")
        refused(post_chat(url, variant, marker, headers=bearer(token_a)), marker)
    escaped = "".join(f"\\u{ord(c):04x}" for c in bob)  # JSON escapes decode to Bob's id exactly
    marker = unique("m")
    result = post_chat(url, raw_body=f'{{"userId":"{escaped}","message":"{marker}"}}', headers=bearer(token_a))
    assert_refused(result, 403, "user_mismatch")
    refused_markers.append(marker)
    for first, second in ((alice, bob), (bob, alice)):
        marker = unique("m")
        body = f'{{"userId":"{first}","userId":"{second}","message":"{marker}"}}'
        refused(post_chat(url, raw_body=body, headers=bearer(token_a)), marker, (400,))

    # 2. Header games: Bob's id in other headers, a second Authorization.
    marker = unique("m")
    answered_not_as_bob(post_chat(url, message=marker, headers={**bearer(token_a), "X-User-Id": bob,
                                                                 "X-Forwarded-User": bob, "X-Auth-Subject": bob}),
                      marker)
    marker = unique("m")
    answered_not_as_bob(post_chat(url, message=marker, headers=bearer(token_a),
                                path=f"/api/chat?userId={bob}&sub={bob}"), marker)
    for second in (f"Bearer {bob}", f"Bearer {token_b.split('.')[0]}..", "Basic Ym9iOg=="):
        for order in ((f"Bearer {token_a}", second), (second, f"Bearer {token_a}")):
            marker = unique("m")
            body = json.dumps({"message": marker}).encode()
            result = raw_post(url, "/api/chat", [("Content-Type", "application/json")] +
                              [("Authorization", v) for v in order], body)
            # nginx refuses a repeated Authorization (400); were they ever
            # joined into one value, chatd refuses two credentials (401).
            refused(result, marker, (400, 401))
    marker = unique("m")
    refused(post_chat(url, message=marker, headers={"Authorization": f"Bearer {token_a} {bob}"}), marker, (401,))

    # 3. Alice's own token without a userId: she gets her own memory only.
    marker = unique("m")
    answered_not_as_bob(post_chat(url, message=marker, headers=bearer(token_a)), marker)

    # 4. A different user whose id differs from Bob's only in case.
    bob_upper = bob.upper()
    marker = unique("m")
    answered_not_as_bob(post_chat(url, message=marker, headers=bearer(auth.hs.token(bob_upper))), marker)

    for marker in refused_markers:
        assert stack.fake.requests(marker) == [], "a refused request reached the model"
    for marker in answered_markers:
        recorded = stack.fake.requests(marker)
        assert len(recorded) == 1
        assert secret not in json.dumps(recorded), "Bob's memory leaked into another user's prompt"

    # Bob's memory got nothing of all this.
    probe = unique("bob-probe")
    assert_ok_as(post_chat(url, message=probe, headers=bearer(token_b)), probe)
    bob_prompt = json.dumps(stack.fake.requests(probe))
    assert secret in bob_prompt
    for marker in refused_markers + answered_markers:
        assert marker not in bob_prompt


def test_flood_of_bad_tokens_spends_nobody_quota(auth, unique):
    url = auth.url("HS256")
    alice, bob = unique("alice"), unique("bob")
    token_a = auth.hs.token(alice)
    wrong_key = Minter("HS256", secret=secrets.token_bytes(48), issuer=ISSUER, audience=AUDIENCE)
    attempts = [
        ({}, 401),
        (bearer(wrong_key.token(bob)), 401),
        (bearer(expired(auth.hs, bob)), 401),
        (bearer("not-a-jwt"), 401),
        (bearer(token_a), 403),  # a valid token naming someone else
    ]
    for i in range(FLOOD_SIZE):
        headers, status = attempts[i % len(attempts)]
        result = post_chat(url, bob, "flood", headers=headers)
        assert result[0] == status, result
    for user in (bob, alice):
        marker = unique("m")
        status, headers, body = post_chat(url, user, marker, headers=bearer(auth.hs.token(user)))
        assert status == 200, body
        assert remaining_quota(headers) == DEFAULT_RATE_LIMIT - 1, headers


# --------------------------------------------------------------------------
# Public-key algorithms


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_token_works(auth, unique, alg):
    user, marker = unique("u"), unique("m")
    assert_ok_as(post_chat(auth.url(alg), message=marker, headers=bearer(auth.minter(alg).token(user))), marker)


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
def test_public_key_algorithm_confusion_is_refused(auth, stack, unique, alg):
    url, user = auth.url(alg), unique("u")
    minter = auth.minter(alg)
    public_pem = (auth.rsa_pub if alg == "RS256" else auth.ec_pub).read_bytes()
    other_key = auth.rsa_other_key if alg == "RS256" else auth.ec_other_key
    cases = [
        # HS256 "signed" with the public key as the shared secret.
        (Minter("HS256", secret=public_pem).token(user), "wrong_algorithm"),
        (Minter("HS256", secret=public_pem.strip()).token(user), "wrong_algorithm"),
        (minter.token(user, header_alg="none"), "wrong_algorithm"),
        (minter.token(user, header_alg="ES256" if alg == "RS256" else "RS256", sign_as=alg), "wrong_algorithm"),
        (Minter(alg, private_key=other_key).token(user), "bad_signature"),
        (expired(minter, user), "token_expired"),
    ]
    if alg == "ES256":
        cases.append((minter.token(user, sign_as="ES256-DER"), "bad_signature"))  # DER, not r||s
    for token, code in cases:
        marker = unique("m")
        assert_refused(post_chat(url, user, marker, headers=bearer(token)), 401, code, token)
        assert stack.fake.requests(marker) == []


# --------------------------------------------------------------------------
# Service mode: a trusted backend names the user


def test_service_tokens_let_the_backend_name_the_user(auth, unique):
    url = auth.url("service")
    for token in auth.service_tokens:
        user, marker = unique("u"), unique("m")
        assert_ok_as(post_chat(url, user, marker, headers=bearer(token)), marker)
    result = post_chat(url, message=unique("m"), headers=bearer(auth.service_tokens[0]))
    assert result[0] == 400 and result[2]["code"] == "missing_field", result


def test_service_mode_refusals(auth, stack, unique):
    url, user = auth.url("service"), unique("victim")
    good = auth.service_tokens[0]
    cases = [
        ({}, "missing_token"),
        ({"Authorization": f"Basic {good}"}, "bad_auth_scheme"),
        (bearer(good[:-1]), "invalid_token"),
        (bearer(good + "0"), "invalid_token"),
        (bearer(good.upper()), "invalid_token"),
        (bearer(secrets.token_hex(32)), "invalid_token"),
        (bearer(auth.hs.token(user)), "invalid_token"),  # a user token is no service token
        ({"Authorization": f"Bearer {good},{auth.service_tokens[1]}"}, "malformed_token"),
    ]
    for headers, code in cases:
        marker = unique("m")
        token = headers.get("Authorization", "").partition(" ")[2] or None
        assert_refused(post_chat(url, user, marker, headers=headers), 401, code, token)
        assert stack.fake.requests(marker) == []


def test_service_mode_flood_spends_no_quota(auth, unique):
    url, victim = auth.url("service"), unique("victim")
    for i in range(FLOOD_SIZE):
        headers = bearer(secrets.token_hex(32)) if i % 2 else {}
        assert post_chat(url, victim, "flood", headers=headers)[0] == 401
    status, headers, body = post_chat(url, victim, unique("m"), headers=bearer(auth.service_tokens[1]))
    assert status == 200, body
    assert remaining_quota(headers) == DEFAULT_RATE_LIMIT - 1, headers


# --------------------------------------------------------------------------
# Start-up: a misconfigured worker refuses to run, naming the variable only


def start_refusal(stack, env_overrides) -> str:
    """Runs one chatd worker with this configuration; it must exit at once with
    status 2. Returns its stderr."""
    env = {k: v for k, v in stack.pool_env(1, env_overrides).items() if v is not None}
    env["PATH"] = os.environ.get("PATH", "/usr/bin:/bin")
    done = subprocess.run([str(stack.build_dir / "bin" / "chatd")], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=START_REFUSAL_TIMEOUT_S)
    assert done.returncode == 2, done
    return done.stderr


def test_start_up_refuses_missing_or_exposed_secrets(auth, stack):
    # jwt is the default mode: configuring nothing does not run open.
    assert "CHATD_JWT_ALGORITHM" in start_refusal(stack, {"CHATD_AUTH_MODE": None})
    assert "CHATD_SERVICE_TOKENS" in start_refusal(stack, {"CHATD_AUTH_MODE": "service"})

    loose = auth.folder / "loose-secret"
    loose.write_bytes(auth.hs_secret)
    loose.chmod(0o644)
    err = start_refusal(stack, {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "HS256",
                                "CHATD_JWT_SECRET_FILE": str(loose)})
    assert "CHATD_JWT_SECRET_FILE" in err and auth.hs_secret.decode() not in err

    short = secrets.token_hex(8)
    SECRETS.append(short)
    err = start_refusal(stack, {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "HS256", "CHATD_JWT_SECRET": short})
    assert "CHATD_JWT_SECRET" in err and short not in err

    loose_tokens = auth.folder / "loose-tokens"
    loose_tokens.write_text(auth.service_tokens[0] + "\n")
    loose_tokens.chmod(0o604)
    err = start_refusal(stack, {"CHATD_AUTH_MODE": "service", "CHATD_SERVICE_TOKENS_FILE": str(loose_tokens)})
    assert "CHATD_SERVICE_TOKENS_FILE" in err and auth.service_tokens[0] not in err


def example_env() -> "dict[str, str]":
    """The example environment file: variable -> value, commented lines included."""
    text = (REPO_ROOT / "systemd/chatd.env.example").read_text()
    return dict(re.findall(r"^#?([A-Z][A-Z0-9_]+)=(.*)$", text, re.M))


def test_the_example_environment_file_sets_no_secret():
    # Issue 12: it set CHATD_JWT_SECRET to a placeholder that chatd accepted.
    text = (REPO_ROOT / "systemd/chatd.env.example").read_text()
    live = set(re.findall(r"^([A-Z][A-Z0-9_]+)=", text, re.M))
    for name in ("CHATD_JWT_SECRET", "CHATD_JWT_SECRET_FILE", "CHATD_SERVICE_TOKENS", "CHATD_SERVICE_TOKENS_FILE",
                 "OPENAI_API_KEY"):
        assert name in example_env(), name  # still documented, commented out
        assert name not in live, f"{name} is set in the example"


@pytest.mark.parametrize("secret", [
    "replace-with-at-least-32-random-bytes-0000",  # the example's old placeholder
    "ChangeMe-" + secrets.token_urlsafe(32),
    "s" * 40,
    "ab" * 20,
    secrets.token_urlsafe(24) + "a" * 8,
    secrets.token_urlsafe(24) + "12345678",
], ids=["example_placeholder", "placeholder_word", "one_byte", "two_bytes", "repeated_run", "counting_run"])
def test_start_up_refuses_placeholder_and_low_entropy_jwt_secrets(stack, secret):
    SECRETS.append(secret)
    err = start_refusal(stack, {"CHATD_AUTH_MODE": "jwt", "CHATD_JWT_ALGORITHM": "HS256", "CHATD_JWT_SECRET": secret,
                                "CHATD_JWT_ISSUER": ISSUER, "CHATD_JWT_AUDIENCE": AUDIENCE})
    assert "CHATD_JWT_SECRET" in err and secret not in err


def test_jwt_mode_without_issuer_or_audience_warns_once_at_start_up(auth):
    # Issue 12: unset, any token signed with the key passes; say so.
    def warnings(name):
        return [r for r in json_log_records(auth.frontends[name].pool.log_text())
                if r.get("event") == "jwt_claims_unchecked"]
    workers = len(auth.frontends["RS256"].pool.worker_pids())
    unchecked = warnings("RS256")  # neither set
    assert len(unchecked) == workers, unchecked  # one line per worker process
    assert unchecked[0]["level"] == "warn"
    assert unchecked[0]["unset"] == "CHATD_JWT_ISSUER, CHATD_JWT_AUDIENCE"
    assert warnings("HS256") == []  # both set


# --------------------------------------------------------------------------
# Last: nothing secret in the logs of all the above


def test_no_token_or_secret_in_any_log(auth, stack, unique):
    # Some traffic of every kind, so that the check means something even alone.
    user = unique("u")
    for headers in (bearer(auth.hs.token(user)), bearer(expired(auth.hs, user)),
                    bearer(auth.hs.token(user, aud="x")), bearer(auth.service_tokens[0])):
        post_chat(auth.url("HS256"), user, unique("m"), headers=headers)
    post_chat(auth.url("service"), user, unique("m"), headers=bearer(auth.service_tokens[0]))
    post_chat(auth.url("service"), user, unique("m"), headers=bearer(auth.service_tokens[1][:-2]))
    frontend = auth.frontends["HS256"]
    assert poll_until(lambda: [r for r in frontend.pool.log_records() if r.get("event") == "auth_failed"],
                      LOG_TIMEOUT_S)

    logs = pool_logs(auth) + stack.pool.log_text() + stack.fake.log_text()
    assert "auth_failed" in logs
    assert MINTED_TOKENS, "no token was minted"
    for token in MINTED_TOKENS:
        assert token not in logs, "a token appears in a log"
        signature = token.rsplit(".", 1)[1]
        if len(signature) >= 16:
            assert signature not in logs, "a token's signature appears in a log"
    for secret in SECRETS:
        assert secret not in logs, "a secret appears in a log"
