"""One config value checked against its type hint; errors name the config key."""

from __future__ import annotations

from typing import Literal

import pytest

from loralab.coerce import coerce
from loralab.errors import LoralabError


@pytest.mark.parametrize(
    "value, tp, want",
    [
        ("16", int | None, 16),  # the more specific type first: "16" stays an int
        (8.0, int, 8),
        ("3e-4", float | None, 3e-4),
        (None, float | None, None),
        ("yes", bool, True),
        ("standard", str | list[str], "standard"),  # a plain word stays a string
        ("q_proj, v_proj", str | list[str], ["q_proj", "v_proj"]),  # a comma list is a list
        ("lm", Literal["classifier", "lm"], "lm"),
        ({"a": 1}, dict, {"a": 1}),
    ],
)  # fmt: skip
def test_values_are_converted_to_their_type(value, tp, want):
    assert coerce(value, tp, "x.y") == want


@pytest.mark.parametrize(
    "value, tp, needle",
    [
        ("prompt", Literal["classifier", "lm"], "Bad value 'prompt' for 'model.head': allowed values are classifier, lm."),
        (True, int, "Bad value True for 'model.head': expected an integer."),
        ("x", float | None, "Bad value 'x' for 'model.head': expected float or null."),
        ("maybe", bool, "expected true or false"),
        (3, list[str], "expected a list"),
    ],
)  # fmt: skip
def test_a_bad_value_names_the_key(value, tp, needle):
    with pytest.raises(LoralabError) as err:
        coerce(value, tp, "model.head")
    assert needle in str(err.value)
