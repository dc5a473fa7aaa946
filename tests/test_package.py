"""What ``import poolformer_seg`` brings into the interpreter."""
import json
import subprocess
import sys

import pytest

# Imports every module of the installed package, then lists sys.modules.
_IMPORT_ALL = '''
import json, pkgutil, sys, importlib
import poolformer_seg
names = [m.name for m in pkgutil.walk_packages(poolformer_seg.__path__,
                                                'poolformer_seg.')]
for name in names:
    importlib.import_module(name)
print(json.dumps({'package': names, 'loaded': sorted(sys.modules)}))
'''


@pytest.mark.slow
def test_package_holds_no_upstream_reference_code():
    out = subprocess.run([sys.executable, '-c', _IMPORT_ALL], check=True,
                         capture_output=True, text=True).stdout
    found = json.loads(out.strip().splitlines()[-1])
    # the mmpretrain reference lives in tools/upstream_reference.py, used
    # only by the benchmark and the tests
    assert not [m for m in found['package'] if 'upstream' in m]
    assert not [m for m in found['loaded']
                if m.split('.')[0] in ('mmpretrain', '_mmpretrain_backbones')]


_HUGE_PAGES = """
import os
import poolformer_seg
import torch
print(os.environ.get('THP_MEM_ALLOC_ENABLE'))
"""


def test_importing_the_package_leaves_the_allocator_to_the_caller():
    """Huge pages change both routes' speed, each way depending on the
    machine (docs/benchmark.md): importing the package, even before torch,
    sets nothing, so that ours and the upstream route run alike."""
    import os
    environ = {k: v for k, v in os.environ.items()
               if k != 'THP_MEM_ALLOC_ENABLE'}
    out = subprocess.run([sys.executable, '-c', _HUGE_PAGES], check=True,
                         capture_output=True, text=True, env=environ).stdout
    assert out.strip().splitlines()[-1] == 'None'
