"""widenet.listing.listed: the one way messages list names."""

from pathlib import Path

from widenet.listing import listed


def test_short_lists_are_written_out_in_full():
    assert listed([]) == ""
    assert listed(["a"]) == "a"
    assert listed(["a", "b", "c", "d", "e"]) == "a, b, c, d, e"


def test_long_lists_show_the_first_items_and_count_the_rest():
    assert listed([f"k{i}" for i in range(8)]) == "k0, k1, k2, k3, k4, ... and 3 more"
    assert listed(range(4), shown=2) == "0, 1, ... and 2 more"
    assert listed((Path("x") / name for name in "abc"), shown=1) == f"{Path('x/a')}, ... and 2 more"
