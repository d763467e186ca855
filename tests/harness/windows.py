"""Fixed rate windows as tests must see them.

A fixed window's counter is one hash per user that resets, and expires, when
Redis's clock crosses a multiple of the window (a whole minute by default). A
test whose requests straddle that boundary gets a fresh quota half-way, and
finds its counter gone afterwards: what it asserts then depends on the time
of day. So a test either counts with the sliding log, whose TTL runs a whole
window from each admission, or runs its fixed-window part inside one window
with `in_one_fixed_window`.
"""

import time

import pytest

from harness.clients import redis_now_ms

# An attempt starts only with this much of its window left (at most half the
# window), so that a retry is rare; it is retried, with fresh state, when it
# straddled a boundary all the same.
WINDOW_ATTEMPTS = 3
FIXED_WINDOW_MARGIN_MS = 5000

# Pool settings under which a user's chat counter outlives any test: the
# sliding log, an hour's window.
LASTING_RATE_ENV = {"CHATD_RATE_ALGORITHM": "sliding", "CHATD_RATE_WINDOW_S": "3600"}


def in_one_fixed_window(redis, window_s: int, attempt):
    """Runs attempt() until one run began and ended in the same fixed window of
    `redis`'s clock (so no window reset during it); returns its result.
    attempt() must start from fresh state (a new user) each time."""
    window_ms = window_s * 1000
    margin_ms = min(window_ms // 2, FIXED_WINDOW_MARGIN_MS)
    for _ in range(WINDOW_ATTEMPTS):
        left_ms = window_ms - redis_now_ms(redis) % window_ms
        if left_ms < margin_ms:
            time.sleep((left_ms + 10) / 1000)  # to the next window's start, by Redis's clock: not a synchronisation
        before = redis_now_ms(redis) // window_ms
        result = attempt()
        if redis_now_ms(redis) // window_ms == before:
            return result
    pytest.fail(f"{WINDOW_ATTEMPTS} attempts all straddled a fixed window boundary")
