"""Tiers — where a decoded block's bytes live: host RAM (bytes objects) or a torch device (uint8 tensors).

A tier only stores, charges and counts; which key goes where is the policy's decision (cache/policy.py)
and the DecodeCache applies it. Each tier charges an entry what it really costs in the memory it lives
in, so that a budget bounds memory even when blocks are tiny (a 100-byte file is a 100-byte block):

- RAM: the plaintext plus RAM_ENTRY_OVERHEAD for the bytes object header and the dict/OrderedDict
  slots that index it here and in the policy.
- device: the plaintext rounded up to DEVICE_ALIGNMENT, the granularity of CUDA's caching allocator.
  The tensor's host-side object (DEVICE_HOST_OVERHEAD) is host RAM, stated, not charged to either budget.

Threading: none of its own; the DecodeCache calls a tier only while holding its lock.
"""

from __future__ import annotations

# A RAM entry's bytes header plus its dict/OrderedDict slots and the probation tuple (tier dict +
# policy queue), measured with tracemalloc (bench/cache_bench.py overhead, docs/benchmarks.md) and
# rounded up for the slack of a dict between resizes.
RAM_ENTRY_OVERHEAD = 256

# CUDA's caching allocator hands out blocks in multiples of 512 bytes.
DEVICE_ALIGNMENT = 512

# Host memory per device entry (torch.Tensor, TensorImpl, StorageImpl, dict and policy slots), from RSS
# growth over many one-byte tensors (noisy: allocator reuse). Not charged to a budget: ~0.8 % of the
# device tier's size in host RAM at 64 KiB blocks.
DEVICE_HOST_OVERHEAD = 500


def ram_charge(length: int) -> int:
    return length + RAM_ENTRY_OVERHEAD


def device_charge(length: int) -> int:
    return -(-length // DEVICE_ALIGNMENT) * DEVICE_ALIGNMENT


class RamTier:
    """Block plaintexts as bytes objects; a hit returns the stored object itself (no copy)."""

    name = "ram"

    def __init__(self):
        self._data: dict[bytes, bytes] = {}
        self.bytes = 0  # charged bytes (ram_charge), what the budget bounds

    def get(self, key: bytes) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, data: bytes) -> None:
        assert key not in self._data
        self._data[key] = data
        self.bytes += ram_charge(len(data))

    def pop(self, key: bytes) -> bytes:
        data = self._data.pop(key)
        self.bytes -= ram_charge(len(data))
        return data

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


class DeviceTier:
    """Block plaintexts as uint8 tensors on a torch device (CUDA, or CPU tensors in CI).

    The copy in happens on demotion and the copy out on promotion; on CUDA from pageable host
    memory both are synchronous, so a tensor is complete when put() returns.
    """

    name = "device"

    def __init__(self, device):
        """device: a torch device, or None for no device tier (then torch is not even imported: it
        costs ~1.8 s of start-up to every llmfs command)."""
        if device is not None:
            import torch

            self._torch = torch
            device = torch.device(device)
        self.device = device
        self._data: dict = {}  # key -> torch.Tensor
        self.bytes = 0  # charged bytes (device_charge)

    def put(self, key: bytes, data: bytes) -> None:
        assert key not in self._data
        # bytearray: torch.frombuffer wants a writable buffer (a bytes object makes it warn, and
        # silencing warnings is not thread-safe); on CPU the tensor then owns this private copy, so
        # the caller's bytes object can be freed.
        torch = self._torch
        if data:
            host = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        else:
            host = torch.empty(0, dtype=torch.uint8)
        self._data[key] = host.to(self.device) if self.device.type != "cpu" else host
        self.bytes += device_charge(len(data))

    def read(self, key: bytes) -> bytes:
        """A copy of an entry's plaintext, the entry staying here."""
        return self._data[key].cpu().numpy().tobytes()

    def take(self, key: bytes) -> bytes:
        """Remove an entry and return its plaintext (one device→host copy)."""
        t = self._data.pop(key)
        self.bytes -= device_charge(t.numel())
        return t.cpu().numpy().tobytes()

    def drop(self, key: bytes) -> None:
        t = self._data.pop(key)
        self.bytes -= device_charge(t.numel())

    def release(self) -> None:
        """Give freed device memory back to the driver: CUDA's caching allocator keeps it otherwise."""
        if self.device is not None and self.device.type == "cuda":
            self._torch.cuda.empty_cache()

    def __contains__(self, key: bytes) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)
