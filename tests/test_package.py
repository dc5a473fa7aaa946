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
{first}
import torch
print(os.environ.get('THP_MEM_ALLOC_ENABLE'))
"""


def _huge_pages_run(first, **env):
    import os
    environ = {k: v for k, v in os.environ.items()
               if k != 'THP_MEM_ALLOC_ENABLE'}
    environ.update(env)
    return subprocess.run(
        [sys.executable, '-c', _HUGE_PAGES.format(first=first)], check=True,
        capture_output=True, text=True, env=environ).stdout.strip()


def test_importing_the_package_first_asks_for_huge_pages():
    """Imported before torch (as the tools do), the package sets PyTorch's
    huge-page switch; a value the caller set wins; after torch it is too
    late and nothing is set."""
    assert _huge_pages_run('import poolformer_seg') == '1'
    assert _huge_pages_run('import poolformer_seg',
                           THP_MEM_ALLOC_ENABLE='0') == '0'
    assert _huge_pages_run('import torch; import poolformer_seg') == 'None'


def test_tools_import_the_package_before_torch():
    import os.path as osp
    import re
    root = osp.dirname(osp.dirname(osp.abspath(__file__)))
    for tool in ('train.py', 'test.py', 'inference.py', 'benchmark.py',
                 'analysis/benchmark_eval.py'):
        with open(osp.join(root, 'tools', tool)) as f:
            text = f.read()
        ours = text.index('import poolformer_seg')
        torch = re.search(r'^import torch|^from torch', text, re.M)
        assert torch is None or ours < torch.start(), tool
