"""Fixtures of the fusion tests."""

from __future__ import annotations

import pytest

from .helpers import make_model


@pytest.fixture(scope="module")
def model():
    return make_model()
