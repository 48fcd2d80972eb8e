"""experiments/allocator.py: freed activation-sized buffers go back to the system at once."""
import platform
import subprocess
import sys

import pytest

from helpers import ROOT

SCRIPT = """
import sys, torch
from pathlib import Path
from intrafusion.experiments.allocator import release_large_buffers
def rss(): return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2 ** 20
if sys.argv[1] == "set":
    assert release_large_buffers()
a = torch.ones(4 << 20); del a  # 16 MiB: glibc raises its mapping threshold past this size
b = torch.ones(4 << 20); before = rss(); del b
print(before - rss())
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_a_freed_16_mib_buffer_is_returned_once_set_and_kept_by_default():
    def freed(mode):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        return float(out)
    assert freed("set") == pytest.approx(16, abs=1)
    assert freed("default") < 1  # the behaviour the setting exists for


REUSE = """
import resource, torch
from intrafusion.experiments.allocator import release_large_buffers, reuse_freed_buffers
assert release_large_buffers()  # as the CLI sets it first
if __import__("sys").argv[1] == "reuse":
    assert reuse_freed_buffers()
for _ in range(2):
    torch.ones(16 << 20).sum()  # a 64 MiB buffer, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20).sum()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * 4096 / 2 ** 20)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_reused_buffers_are_not_mapped_and_zeroed_again():
    """Ten more 64 MiB buffers: fresh pages (minor faults) for every one of them once freed
    buffers go back to the system, next to none when they are kept for reuse."""
    def faulted_mib(mode):
        return float(subprocess.run([sys.executable, "-c", REUSE, mode], cwd=ROOT, capture_output=True,
                                    text=True, check=True).stdout)
    assert faulted_mib("release") > 9 * 64
    assert faulted_mib("reuse") < 64
