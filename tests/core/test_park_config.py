"""`park_after`, the app setting that parks idle `balance` connections in the balancer."""
from __future__ import annotations

import pytest
from test_config import document, problems, write

from supervisor.config.reader import load


@pytest.mark.parametrize("line, expected", [("", 0.002), ("park_after = 0", 0.0), ("park_after = 0.05", 0.05),
                                            ("park_after = 1", 1.0)])
def test_park_after_is_read_in_seconds_and_is_two_ms_by_default(tmp_path, line, expected):
    config = load(write(tmp_path, document(app=line)))
    assert config.apps["blog"].park_after == expected


@pytest.mark.parametrize("value", ["-0.001", '"2ms"', "true", "86401"])
def test_a_bad_park_after_names_its_key(tmp_path, value):
    _, found = problems(tmp_path, document(app=f"park_after = {value}"))
    assert len(found) == 1 and "apps.blog.park_after" in found[0]
    assert "a number of seconds from 0 to 86400" in found[0]
