from __future__ import annotations

import sys

import pytest

from nmt.runtime import keep_freed_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_allocator_settings_take_on_linux():
    assert keep_freed_memory() is True
