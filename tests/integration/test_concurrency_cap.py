"""Issue 12 A: one user could occupy the whole pool. Each chat holds a worker
thread while the model answers, so chatd caps the chats one user has in flight
(CHATD_MAX_CONCURRENT_PER_USER), counted in Redis with leases that expire, so
the cap holds across workers and hosts and survives a killed worker.

The slow chats here are held by the fake model's per-message delay; the tests
wait for the model to have received them (never for a time) before sending
the request that must be refused."""

import os
import signal
import threading

from harness import keys as rkeys
from harness.stack import poll_until, post_chat

CAP = "2"
# Long enough that the held chats are certainly still in flight while the test
# sends its other requests; they are not waited for where it can be avoided.
HELD_MS = 8000
ARRIVAL_TIMEOUT_S = 30
LEASE_EXPIRY_TIMEOUT_S = 60


def rate_remaining(headers) -> int:
    # RateLimit: "default";r=<remaining>;t=<seconds>
    return int(headers["ratelimit"].split(";r=")[1].split(";")[0])


class HeldChats:
    """Chats of `user` that the fake model holds for `held_ms`, sent on threads."""

    def __init__(self, stack, user: str, marker: str, held_ms: int = HELD_MS) -> None:
        self.stack, self.user, self.marker, self.held_ms = stack, user, marker, held_ms
        self.results: "list" = []
        self.threads: "list[threading.Thread]" = []
        self._lock = threading.Lock()

    def send(self, url: str) -> None:
        index = len(self.threads)

        def run():
            result = post_chat(url, self.user, f"{self.marker} {index} #fake:delay_ms={self.held_ms}",
                               timeout=self.held_ms / 1000 + 60)
            with self._lock:
                self.results.append(result)

        thread = threading.Thread(target=run)
        thread.start()
        self.threads.append(thread)

    def wait_arrived(self, count: int) -> None:
        arrived = poll_until(lambda: len(self.stack.fake.requests(contains=self.marker)) >= count,
                             ARRIVAL_TIMEOUT_S)
        assert arrived, f"the model did not receive {count} held chats"

    def join(self) -> "list":
        for thread in self.threads:
            thread.join()
        return self.results


def assert_too_many_concurrent(result) -> None:
    status, headers, body = result
    assert status == 429, (status, body)
    assert body["code"] == "too_many_concurrent", body
    assert headers["retry-after"] == "1"
    assert body["retryAfter"] == 1


def test_one_user_cannot_occupy_the_pool_third_concurrent_chat_is_429_too_many_concurrent(stack, new_pool, unique):
    # A sliding log of 10 minutes: no window boundary can reset the quota
    # that the test counts while the held chats run.
    front = new_pool({"CHATD_MAX_CONCURRENT_PER_USER": CAP, "CHATD_RATE_ALGORITHM": "sliding",
                      "CHATD_RATE_WINDOW_S": "600"}, workers=2, threads=4)
    user, bystander = unique("cap"), unique("bystander")
    held = HeldChats(stack, user, unique("held"))
    held.send(front.url)
    held.send(front.url)
    held.wait_arrived(2)

    refused = post_chat(front.url, user, "a third at once")
    assert_too_many_concurrent(refused)
    # Over the cap consumes no quota: two admissions so far, 28 of 30 left.
    assert rate_remaining(refused[1]) == 28

    status, _, body = post_chat(front.url, bystander, "another user is unaffected")
    assert status == 200, body

    results = held.join()
    assert sorted(r[0] for r in results) == [200, 200], results
    status, headers, body = post_chat(front.url, user, "after they finished")
    assert status == 200, body
    assert rate_remaining(headers) == 27
    assert stack.redis.command("EXISTS", rkeys.user_key(user, "inflight")) == 0  # every lease given back


def test_one_user_cannot_occupy_the_pool_cap_holds_across_two_hosts(stack, new_pool, unique):
    # Two pools sharing the Redis are two hosts.
    host_a = new_pool({"CHATD_MAX_CONCURRENT_PER_USER": CAP}, workers=1, threads=4)
    host_b = new_pool({"CHATD_MAX_CONCURRENT_PER_USER": CAP}, workers=1, threads=4)
    user = unique("cap2")
    held = HeldChats(stack, user, unique("held"))
    held.send(host_a.url)
    held.send(host_b.url)
    held.wait_arrived(2)
    assert_too_many_concurrent(post_chat(host_a.url, user, "third via a"))
    assert_too_many_concurrent(post_chat(host_b.url, user, "third via b"))
    assert sorted(r[0] for r in held.join()) == [200, 200]


def test_one_user_cannot_occupy_the_pool_a_killed_workers_lease_expires(stack, new_pool, unique):
    # A short deadline makes the lease short (deadline + Redis timeout + 1 s).
    front = new_pool({"CHATD_MAX_CONCURRENT_PER_USER": "1", "CHATD_REQUEST_DEADLINE_MS": "3000",
                      "CHATD_LLM_MAX_RETRIES": "0"}, workers=1, threads=4)
    user = unique("cap-kill")
    held = HeldChats(stack, user, unique("held"), held_ms=60000)
    held.send(front.url)
    held.wait_arrived(1)
    assert_too_many_concurrent(post_chat(front.url, user, "while held"))

    [worker] = front.pool.worker_pids()
    os.kill(worker, signal.SIGKILL)
    assert poll_until(lambda: front.pool.worker_pids() not in ([], [worker]), ARRIVAL_TIMEOUT_S), \
        "multiwatch did not replace the killed worker"
    # The dead worker never released its lease: it is still there...
    assert stack.redis.command("ZCARD", rkeys.user_key(user, "inflight")) == 1
    # ...until it expires, and then the user can chat again.
    admitted = poll_until(lambda: post_chat(front.url, user, "after the crash")[0] == 200, LEASE_EXPIRY_TIMEOUT_S)
    assert admitted, "the killed worker's lease never expired"
    held.join()
