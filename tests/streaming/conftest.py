from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def sockets() -> Iterator[contextlib.ExitStack]:
    """Closes the sockets a test opens when it ends, whether it passed or not."""
    with contextlib.ExitStack() as stack:
        yield stack
