"""The singling-out floor's hold-back: no id leaves before K have arrived, then all stream live."""

from __future__ import annotations

from marketplace_server.services.search import MatchFloor


def test_matches_are_held_until_the_floor_is_reached_then_released_together_and_live() -> None:
    floor = MatchFloor(3)
    assert floor.admit(["a"]) == []
    assert floor.admit(["b"]) == []
    assert floor.admit(["c", "d"]) == ["a", "b", "c", "d"]
    assert floor.admit(["e"]) == ["e"]
    assert not floor.withholds(5)


def test_a_search_ending_below_the_floor_is_withheld_but_one_matching_nobody_is_not() -> None:
    floor = MatchFloor(3)
    assert floor.admit(["a", "b"]) == []
    assert floor.withholds(2)
    assert not floor.withholds(0)


def test_a_floor_of_one_is_off() -> None:
    floor = MatchFloor(1)
    assert floor.admit(["a"]) == ["a"]
    assert not floor.withholds(1)
