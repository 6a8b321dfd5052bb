"""The mutation catalogue stays replayable: every recorded slip still applies to its module exactly once, and
each has a killing test or a reason it is equivalent (replaying them is `python tests/mutants/replay.py`)."""

from tests.mutants.replay import CATALOGUE, catalogue, load_areas, problems


def test_every_slip_still_applies_and_has_a_killer_or_a_reason():
    areas = load_areas()
    assert areas, "tests/mutants/ holds no catalogue"
    found = [line for area in areas for line in problems(area)]
    assert not found, "\n".join(found)


def test_the_written_catalogue_is_current():
    assert CATALOGUE.read_text(encoding="utf-8") == catalogue(load_areas()), (
        "tests/MUTANTS.md is out of date: python tests/mutants/replay.py --catalogue"
    )
