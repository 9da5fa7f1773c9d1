"""Fixtures shared by the core tests."""
import pytest
from test_balancer_shell import Harness


@pytest.fixture
def harnesses():
    """Factory: harnesses(**kwargs) -> a test_balancer_shell Harness, closed at teardown."""
    made = []

    def make(**kwargs):
        harness = Harness(**kwargs)
        made.append(harness)
        return harness
    yield make
    for harness in made:
        harness.close()
