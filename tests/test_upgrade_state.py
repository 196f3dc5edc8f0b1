"""The upgrade's state: versioned JSON in an inheritable memfd, read back once by the new image."""

from __future__ import annotations

import os

import pytest

from balancer import upgrade_state
from balancer.upgrade_state import StateError


def state(version: int = upgrade_state.VERSION) -> dict:
    return {"version": version, "carried": {"argv": ["--workers", "2"], "listeners": [{"fd": 5, "label": "x"}],
                                           "workers": [{"pid": 12, "slot": 0, "channel_fd": 7, "board_fd": 8}]},
            "detail": {"master": {"accepted": 3}}}


def test_round_trip_through_a_memfd_and_the_environment():
    fd = upgrade_state.write_memfd(upgrade_state.encode(state()))
    try:
        assert os.get_inheritable(fd)  # it must survive execve
        environ = {upgrade_state.ENV: str(fd), "OTHER": "1"}
        got = upgrade_state.take_from_environ(environ)
    finally:
        with pytest.raises(OSError):
            os.fstat(fd)  # read once, then closed
    assert got == state() and upgrade_state.compatible(got)
    assert environ == {"OTHER": "1"}  # the workers this image starts never see it


def test_no_state_is_a_plain_start():
    assert upgrade_state.take_from_environ({}) is None


def test_another_version_is_read_but_not_compatible():
    got = upgrade_state.decode(upgrade_state.encode(state(upgrade_state.VERSION + 1)))
    assert not upgrade_state.compatible(got)
    assert got["carried"]["workers"][0]["pid"] == 12  # what every version carries is still there


@pytest.mark.parametrize("data", [b"", b"not json", b"[1]", b'{"carried": {}}', b'{"version": 1}',
                                  b'{"version": 1, "carried": {"listeners": []}}'])
def test_what_is_not_a_state_is_refused(data):
    with pytest.raises(StateError):
        upgrade_state.decode(data)


def test_bad_environment_values_are_refused():
    with pytest.raises(StateError):
        upgrade_state.take_from_environ({upgrade_state.ENV: "x"})
    fd = os.open(os.devnull, os.O_RDONLY)
    os.close(fd)  # a closed fd
    with pytest.raises(StateError):
        upgrade_state.take_from_environ({upgrade_state.ENV: str(fd)})


def test_encode_needs_version_and_carried():
    with pytest.raises(StateError):
        upgrade_state.encode({"carried": {}})
