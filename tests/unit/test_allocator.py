"""Large buffers go back to the system (the memory bound itself is tests/faults/test_memory_bound.py)."""

import platform

import pytest

from embedstream import allocator


def test_the_mmap_threshold_is_pinned_on_glibc():
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc: nothing to pin, and return_large_buffers says so")
    assert allocator.return_large_buffers() is True
