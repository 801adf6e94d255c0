"""protocol.decode_object's per-agent memo: a step message's saved_split that repeats the agent's previous one is
checked once and its answer shared; any other split - one equal under == but of other types (256.0 for 256, True for
1) included - is checked as without the memo. The memo never changes what a message decodes to."""

from __future__ import annotations

import copy
import json

from batchmon import protocol

SPLIT = {"batch": 256, "saved": 4194304, "in_blocks": 0, "block_inputs": 4259840, "blocks": 9, "block_max": 0,
         "output": 10240, "amp_saved": 2129920, "amp_unknown": 0,
         "block_seq": {"kinds": [[65536, [], [131072, 2048]], [524288, [-4, 8], [1048576, 2048]]],
                       "order": [[0, 0, 0], [1, 524288, 0], [1, 524288, 0]], "before": 0, "after": 0}}


def _message(n: int, split: object) -> dict:
    comps = {name: 1000 * (i + 1) for i, name in enumerate(protocol.COMPONENTS)}
    return {"v": 1, "type": "step", "step": n, "time": 1e9 + n, "step_seconds": 0.01, "batch_size": 256,
            "components": comps, "peak_allocated": 30000, "saved_split": split, "inactive_split": 5}


def test_the_memo_never_changes_a_decoded_step():
    variants = [SPLIT, copy.deepcopy(SPLIT), dict(SPLIT, batch=256.0), dict(SPLIT, blocks=True), SPLIT,
                dict(SPLIT, block_seq={"kinds": []}), dict(SPLIT, saved=-1), None, SPLIT, dict(SPLIT, batch=0),
                dict(SPLIT, extra=1), SPLIT]
    memo: dict = {}
    decoded = []
    for n, split in enumerate(variants):
        data = json.loads(json.dumps(_message(n, split)))  # fresh objects, as each line's JSON
        with_memo = protocol.decode_object(data, memo)
        assert with_memo == protocol.decode_object(data)
        assert with_memo.saved_split == protocol.decode_object(data).saved_split
        assert type(with_memo.saved_split) is type(protocol.decode_object(data).saved_split)
        decoded.append(with_memo)
    assert decoded[0].saved_split is not None
    assert decoded[1].saved_split is decoded[0].saved_split  # the same split again: checked once, shared
    assert decoded[2].saved_split is None  # batch 256.0 == 256, but not an integer: refused, not the memo's
    assert decoded[4].saved_split == decoded[0].saved_split


def test_without_a_memo_nothing_is_kept():
    first = protocol.decode_object(json.loads(json.dumps(_message(1, SPLIT))))
    second = protocol.decode_object(json.loads(json.dumps(_message(2, SPLIT))))
    assert first.saved_split == second.saved_split and first.saved_split is not second.saved_split
