"""Request ids: the ledger's key for every request, and the id a client and the logs see."""

from __future__ import annotations

import itertools
import os
import time

# "req_" + 32 hex digits: the time in milliseconds, a random number drawn once per process
# (again in a forked child), a counter. Time first, so that the ledger's indexes on request ids
# grow at their end: random ids would dirty a random index page per request in every commit.
_process_tag = os.urandom(5).hex()
_request_counter = itertools.count()


def _new_process_tag() -> None:
    global _process_tag
    _process_tag = os.urandom(5).hex()


os.register_at_fork(after_in_child=_new_process_tag)


def new_request_id() -> str:
    count = next(_request_counter) & 0xFF_FFFF_FFFF
    return f"req_{time.time_ns() // 1_000_000:012x}{_process_tag}{count:010x}"
