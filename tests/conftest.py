"""Fixtures shared by the tests; the model builders live in tiny_models.py."""

import pytest

from tiny_models import ARCHS


@pytest.fixture(params=list(ARCHS))
def arch(request) -> str:
    return request.param

