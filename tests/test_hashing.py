"""Block hashing: determinism across processes, incremental growth, namespaces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from radix import Namespace, hash_blocks, token_bytes
from radix.hashing import BlockChain, chain_key, tokens_from_bytes

NS = Namespace("smollm2-135m:abc", dtype="bfloat16", block_size=16)


def test_chain_definition_matches_design():
    toks = list(range(40))
    c = hash_blocks(NS.root(), toks, 16)
    assert NS.root() == xxhash.xxh3_128_digest(NS.encode())
    parent = NS.root()
    for i, key in enumerate(c.keys):
        blk = b"".join(t.to_bytes(4, "little", signed=True) for t in toks[16 * i:16 * i + 16])
        parent = xxhash.xxh3_128_digest(parent + blk)
        assert key == parent
    assert len(c.keys) == 2 and tokens_from_bytes(c.tail) == toks[32:]


def test_golden_value_never_changes():
    # Keys are persisted in LMDB and Redis: a change here orphans every stored block.
    c = hash_blocks(Namespace("golden").root(), list(range(16)), 16)
    assert c.keys[0].hex() == GOLDEN


GOLDEN = "a4fef02dcd2b9187909cffe44eaab11b"


def test_same_chain_in_another_process():
    toks = list(range(1000, 1000 + 16 * 50 + 7))
    here = [k.hex() for k in hash_blocks(NS.root(), toks, 16).keys]
    code = (
        "import sys, json\n"
        "from radix import Namespace, hash_blocks\n"
        f"ns = Namespace({NS.model!r}, dtype={NS.dtype!r}, block_size=16)\n"
        f"print(json.dumps([k.hex() for k in hash_blocks(ns.root(), {toks!r}, 16).keys]))\n"
    )
    env_seeds = ["0", "12345"]  # differing hash seeds must not matter
    for seed in env_seeds:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, env={"PYTHONHASHSEED": seed, "PATH": ""},
                             cwd=str(Path(__file__).parents[1]))
        assert json.loads(out.stdout) == here


@given(st.lists(st.integers(-(2**31), 2**31 - 1), max_size=200),
       st.lists(st.integers(1, 40), max_size=10))
def test_incremental_equals_one_shot(tokens, cuts):
    full = hash_blocks(NS.root(), tokens, 16)
    inc = BlockChain(NS.root(), 16)
    pos = 0
    for cut in cuts:
        inc.extend(tokens[pos:pos + cut])
        pos += cut
    inc.extend(tokens[pos:])
    assert inc.keys == full.keys and inc.blocks == full.blocks and inc.tail == full.tail
    assert inc.num_tokens == len(tokens)


def test_namespaces_never_share_keys():
    toks = list(range(32))
    variants = [
        NS, Namespace("other-model", block_size=16), Namespace(NS.model, dtype="float16"),
        Namespace(NS.model, tenant="acme"), Namespace(NS.model, layout=2),
    ]
    keys = {hash_blocks(ns.root(), toks, 16).keys[0] for ns in variants}
    assert len(keys) == len(variants)


def test_fork_and_truncate_are_independent():
    c = hash_blocks(NS.root(), list(range(50)), 16)
    f = c.fork()
    f.extend(list(range(100, 120)))
    assert len(c.keys) == 3 and len(f.keys) == 4
    c.truncate(1)
    assert len(c.keys) == 1 and c.last_key == f.keys[0] and c.tail == b""


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="int32"):
        token_bytes([2**31])
    with pytest.raises(ValueError, match="integers"):
        token_bytes(["a"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="block_size"):
        Namespace("m", block_size=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        BlockChain(NS.root(), 16).extend(b"abc")
    assert chain_key(NS.root(), token_bytes(range(16))) == hash_blocks(
        NS.root(), list(range(16)), 16).keys[0]
