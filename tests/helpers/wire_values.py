"""Hypothesis strategies for arbitrary msgpack values: what a hostile client may put anywhere
in a message, for the fuzz tests of the protocol and of every method's arguments."""

from __future__ import annotations

from typing import Any

import msgpack
from hypothesis import strategies as st


def msgpack_values(
    *, text_size: int, key_size: int, max_leaves: int, ext: bool = False
) -> st.SearchStrategy[Any]:
    """Nested lists and string-keyed maps of every msgpack scalar, integers over the whole
    64-bit range of either sign; with ``ext``, msgpack ext values too."""
    scalars = [
        st.none(),
        st.booleans(),
        st.integers(-(2**63), 2**64 - 1),
        st.floats(),
        st.text(max_size=text_size),
        st.binary(max_size=text_size),
    ]
    if ext:
        scalars.append(st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8)))
    return st.recursive(
        st.one_of(scalars),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=key_size), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )
