"""Sharing by default: with the default policy (write-back) and a shared tier, a second
engine hits what the first computed without any eviction, and greedy tokens equal the
cache-off reference (real SmolLM2, real redis-server and LMDB)."""

from __future__ import annotations

import pytest

from tests.test_engine import make_engine, prompts, reference, run  # noqa: F401


@pytest.mark.parametrize("shared", ["disk", "redis"])
def test_second_engine_hits_blocks_published_at_commit(smollm2, model, reference,  # noqa: F811
                                                       shared, tmp_path, redis_server):
    kw: dict = {}
    if shared == "disk":
        kw.update(disk_path=str(tmp_path / "disk"), disk_bytes=1 << 30)
    else:
        kw.update(redis_url=redis_server.url)
    first = make_engine(smollm2, model, **kw)  # default policy: write-back
    ps = prompts(smollm2)
    run(first, ps[:1], tag="first")
    first.store.flush()
    s = first.store.stats()
    assert s.evictions == {} and s.index.blocks[shared] > 0  # published, not evicted
    if shared == "disk":
        first.store.close()  # one LMDB environment per process
    second = make_engine(smollm2, model, **kw)
    outs = run(second, ps[:1], tag="second")
    assert outs[0].cached_tokens.get(shared, 0) >= 16 * (len(ps[0]) // 32)
    assert [o.token_ids for o in outs] == reference[:1]
    second.store.close()
    if shared == "redis":
        first.store.close()
