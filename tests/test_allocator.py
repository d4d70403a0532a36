"""blip.allocator: the glibc settings blip commands make, and a peak-memory measure that sees through them."""

import pytest
import torch

from blip import allocator
from blip.bench.cost import peak_memory_mb

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc (Linux)")


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, option, value):
        self.calls.append((option, value))
        return 1


def test_keep_freed_memory_sets_both_thresholds(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert allocator.keep_freed_memory(mmap_threshold=1 << 20, trim_threshold=1 << 30) is True
    assert fake.calls == [(allocator.M_MMAP_THRESHOLD, 1 << 20), (allocator.M_TRIM_THRESHOLD, 1 << 30)]


def test_environment_switch_leaves_the_allocator_alone(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: fake)
    monkeypatch.setenv(allocator.ENV_SWITCH, "0")
    assert allocator.keep_freed_memory() is False
    assert fake.calls == []


def test_without_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(allocator, "_glibc", lambda: None)
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert allocator.keep_freed_memory() is False
    assert allocator.release_freed_memory() is False


@glibc
def test_peak_memory_counts_blocks_that_kept_memory_would_hide(monkeypatch):
    monkeypatch.delenv(allocator.ENV_SWITCH, raising=False)
    assert allocator.keep_freed_memory()  # as in every blip command

    def allocate():  # three 16 MiB blocks, under the 32 MiB mmap threshold: served from the heap
        blocks = [torch.ones(4 * 1024 * 1024) for _ in range(3)]
        return sum(float(b[0]) for b in blocks)

    allocate()  # freed again: kept by the process
    peak = peak_memory_mb(allocate)
    if peak is None:
        pytest.skip("no /proc/self/clear_refs")
    assert peak > 40.0  # 48 MiB allocated; kept memory must not hide it
