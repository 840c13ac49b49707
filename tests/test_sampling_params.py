"""``SamplingParams`` refuses bad values with a ``ValueError`` naming the field (never a
raw ``TypeError`` from a comparison deep inside)."""

from __future__ import annotations

import math

import pytest

from engine.sampling import SamplingParams


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": math.nan}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_p": None}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"top_k": 2.5}, "top_k"),
    ({"max_tokens": 2.0}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"n": True}, "n must"),
    ({"seed": 1.5}, "seed"),
    ({"seed": 2**70}, "seed must be in"),  # was an OverflowError mid-generation
    ({"seed": -(2**63) - 1}, "seed must be in"),
    ({"stop": [1]}, "stop must"),
    ({"stop": [""]}, "stop must"),
    ({"stop_token_ids": "ab"}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"ignore_eos": "yes"}, "ignore_eos"),
])
def test_bad_values_are_value_errors_naming_the_field(kwargs: dict[str, object],
                                                      field: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams: {field}"):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


def test_good_values_are_normalized() -> None:
    p = SamplingParams(temperature=1, top_p=1, stop="END", stop_token_ids=[3, 4], seed=-5)
    assert (p.stop, p.stop_token_ids, p.greedy) == (("END",), (3, 4), False)
    assert SamplingParams().greedy
