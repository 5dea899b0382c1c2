"""The per-ISA kernel objects export no weak symbols.

A template or inline function instantiated in an ``-mavx2`` translation unit is emitted as a weak
symbol; the linker keeps one copy per name for the whole module, and may keep the AVX2 one for
the generic code too, which then dies with SIGILL on a CPU without AVX2. Kernel TUs use
internal-linkage helpers instead (see ``Scratch`` in qlinear_avx2.cpp).
"""
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _isa_objects():
    # pyproject.toml: build-dir = "build/{wheel_tag}"; the editable install builds there
    return sorted(ROOT.glob("build/*/CMakeFiles/fastadapt_cpu_kernels.dir/csrc/cpu/kernels/*_avx2.cpp.o"))


@pytest.mark.skipif(shutil.which("nm") is None, reason="binutils nm is not installed")
def test_isa_objects_export_no_weak_symbols():
    objs = _isa_objects()
    assert objs, "no *_avx2.cpp.o under build/: build with pip install --no-build-isolation -e ."
    for obj in objs:
        out = subprocess.run(["nm", "-C", str(obj)], capture_output=True, text=True, check=True).stdout
        weak = [line for line in out.splitlines() if " W " in line or " V " in line]
        assert not weak, f"{obj.name} exports weak symbols (SIGILL hazard):\n" + "\n".join(weak[:10])
