"""Request ids (app/proxy/request_ids.py): unique, time-ordered, and distinct in a
forked worker, whose counter starts where its parent's was."""

from __future__ import annotations

import os
import re

from app.proxy.request_ids import new_request_id

ID = re.compile(r"^req_[0-9a-f]{32}$")


def test_ids_are_unique_well_formed_and_increasing() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(ID.match(i) for i in ids), ids[:3]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)  # time first, then the counter: the ledger's indexes grow at the end


def test_a_forked_child_draws_its_own_process_tag() -> None:
    parent = new_request_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert ID.match(child), child
    # Same millisecond and counter are possible; the tag (digits 12-22) must differ.
    assert child[16:26] != parent[16:26], (parent, child)
