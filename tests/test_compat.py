"""poolformer_seg.compat on mmcv-lite (this environment) and on full mmcv.

The full-mmcv path is simulated in a subprocess: a stand-in ``mmcv._ext``
that provides every compiled symbol ``mmcv.ops`` asks for, so mmcv's real
``ops`` package imports and ``full_mmcv_available()`` is True.
"""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import poolformer_seg  # noqa: F401  (applies compat)
from poolformer_seg import compat

lite_only = pytest.mark.skipif(compat.full_mmcv_available(),
                               reason='full mmcv installed: lite path unused')


@lite_only
def test_mmseg_imports_on_mmcv_lite():
    import mmcv
    import mmseg.models  # noqa: F401  (fails without the stand-in)
    from mmseg.registry import MODELS
    assert MODELS.get('PoolFormer') is poolformer_seg.PoolFormer
    assert 'stand-in' in mmcv.ops.__doc__


@lite_only
@pytest.mark.parametrize('name', ['sigmoid_focal_loss', 'nms', 'RoIAlign'])
def test_missing_op_imports_but_raises_naming_it_when_called(name):
    module = __import__('mmcv.ops', fromlist=[name])
    op = getattr(module, name)  # `from mmcv.ops import name` works
    assert isinstance(op, compat.UnavailableOp)
    with pytest.raises(compat.MissingMmcvOpError,
                       match=rf'mmcv\.ops\.{name} needs the compiled mmcv '
                       r'ops, but only mmcv-lite is installed'):
        op(torch.zeros(1, 4), torch.zeros(1, 4))


@lite_only
def test_dunder_lookups_are_plain_attribute_errors():
    import mmcv.ops
    assert not hasattr(mmcv.ops, '__wrapped__')


def _bilinear_reference(image: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Bilinear sampling at normalised [0, 1] points, align_corners=False.

    A point ``p`` maps to pixel coordinate ``p * size - 0.5``; samples
    outside the image count as zero (grid_sample's default padding).
    """
    channels, height, width = image.shape
    out = np.zeros((channels, len(points)))
    for k, (px, py) in enumerate(points):
        x, y = px * width - .5, py * height - .5
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                if 0 <= yy < height and 0 <= xx < width:
                    out[:, k] += wy * wx * image[:, yy, xx]
    return out


def test_point_sample_is_real_and_correct():
    from mmcv.ops import point_sample
    assert not isinstance(point_sample, compat.UnavailableOp)
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(2, 3, 7, 9, generator=gen, dtype=torch.float64)
    points = torch.rand(2, 11, 2, generator=gen, dtype=torch.float64)
    points[0, 0] = torch.tensor([0., 1.])  # corners: zero padding counts
    sampled = point_sample(image, points, align_corners=False)
    assert sampled.shape == (2, 3, 11)
    for b in range(2):
        np.testing.assert_allclose(
            sampled[b].numpy(),
            _bilinear_reference(image[b].numpy(), points[b].numpy()),
            atol=1e-12)
    grid = F.grid_sample(image, 2 * points.unsqueeze(2) - 1,
                         align_corners=False).squeeze(3)
    torch.testing.assert_close(sampled, grid)


FULL_MMCV = textwrap.dedent('''
    import importlib.machinery, json, sys, types

    # Stand-in for the compiled extension of a full mmcv install: every
    # symbol mmcv.ops looks up exists (and would fail if it were called).
    ext = types.ModuleType('mmcv._ext')
    ext.__spec__ = importlib.machinery.ModuleSpec('mmcv._ext', None)

    def ext_getattr(name):
        if name.startswith('__'):
            raise AttributeError(name)
        def op(*args, **kwargs):
            raise RuntimeError('stand-in compiled op ' + name)
        return op

    ext.__getattr__ = ext_getattr
    sys.modules['mmcv._ext'] = ext

    import poolformer_seg
    from poolformer_seg import compat
    import mmcv.ops, mmseg.models
    from mmengine.runner.checkpoint import CheckpointLoader
    print(json.dumps(dict(
        full=compat.full_mmcv_available(),
        ops_file=mmcv.ops.__file__,
        ops_doc=mmcv.ops.__doc__,
        focal_type=type(mmcv.ops.sigmoid_focal_loss).__name__,
        loader=CheckpointLoader._schemes[''].__module__,
    )))
''')


def test_full_mmcv_is_left_alone():
    result = subprocess.run([sys.executable, '-c', FULL_MMCV],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info['full'] is True
    # mmcv's own ops package, not the stand-in module of compat
    assert info['ops_file'].replace('\\', '/').endswith('mmcv/ops/__init__.py')
    assert info['ops_doc'] is None or 'stand-in' not in info['ops_doc']
    assert info['focal_type'] != 'UnavailableOp'
    # checkpoint loading is still routed through the safe loader
    assert info['loader'] == 'poolformer_seg.utils.safe_load'
