"""Safe checkpoint loading: every loading path refuses a code-executing
pickle (its payload never runs), and real checkpoints still load."""
import os
import os.path as osp
import pickle
import pickletools
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer, MessageHub
from mmengine.runner.checkpoint import (CheckpointLoader, _load_checkpoint,
                                        load_checkpoint)

import poolformer_seg.utils.safe_load as safe_load
from poolformer_seg.engine import atomic_write
from poolformer_seg.models import PoolFormer
from poolformer_seg.utils.safe_load import (TRUST_ENV, CheckpointError,
                                            UnsafeCheckpointError, load)
from tests.conftest import REPO
from tests.engine.toy_runner import toy_runner

REFUSED = 'refused to load'


class ExecPayload:
    """Unpickling it calls ``exec``, which creates ``marker``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return exec, (f'open({self.marker!r}, "w").close()', )


class SystemPayload(ExecPayload):

    def __reduce__(self):
        return os.system, (f'touch {self.marker}', )


class GetattrPayload(ExecPayload):
    """``getattr`` reaching beyond HistoryBuffer's statistics."""

    def __reduce__(self):
        return getattr, (HistoryBuffer, '__init__')


@pytest.fixture(params=[ExecPayload, SystemPayload, GetattrPayload])
def evil(request, tmp_path):
    """(path, marker) of a checkpoint that looks like an mmengine one."""
    marker = str(tmp_path / 'PWNED')
    path = str(tmp_path / 'evil.pth')
    weights = PoolFormer(arch=dict(layers=[1, 1, 1, 1],
                                   embed_dims=[8, 8, 8, 8])).state_dict()
    torch.save({'meta': {'iter': 2, 'epoch': 0},
                'state_dict': weights,
                'message_hub': {'payload': request.param(marker)}}, path)
    yield path, marker
    assert not osp.exists(marker), 'the payload ran'


def test_safe_load_refuses(evil):
    path, _ = evil
    with pytest.raises(UnsafeCheckpointError, match=REFUSED) as err:
        load(path)
    message = str(err.value)
    assert path in message and TRUST_ENV in message
    assert 'Nothing from the file was executed' in message


def test_refused_even_with_torch_force_no_weights_only(evil, monkeypatch):
    # The popular workaround for mmengine on torch >= 2.6 must not reopen
    # the hole: load() passes weights_only=True explicitly.
    monkeypatch.setenv('TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD', '1')
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        load(evil[0])


def test_mmengine_loaders_refuse(evil):
    path, _ = evil
    model = torch.nn.Linear(2, 2)
    for call in (lambda: CheckpointLoader.load_checkpoint(path),
                 lambda: _load_checkpoint(path),
                 lambda: load_checkpoint(model, path)):
        with pytest.raises(UnsafeCheckpointError, match=REFUSED):
            call()


@pytest.fixture
def fake_download(monkeypatch, tmp_path):
    """Serve every URL from a local file; torch.hub cache in tmp_path."""
    served = {}
    monkeypatch.setattr(torch.hub, 'get_dir', lambda: str(tmp_path / 'hub'))
    monkeypatch.setattr(torch.hub, 'download_url_to_file',
                        lambda url, dst, *a, **k: shutil.copy(served['file'],
                                                              dst))
    return served


@pytest.mark.parametrize('url', [
    'https://example.com/evil.pth',
    'open-mmlab://resnet50_v1c',  # name -> URL -> the http loader
])
def test_url_loaders_refuse(evil, fake_download, url):
    fake_download['file'] = evil[0]
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        CheckpointLoader.load_checkpoint(url)


@pytest.mark.parametrize('url', ['s3://bucket/evil.pth', 'pavi://x/e.pth'])
def test_remote_schemes_without_safe_loader_are_refused(url):
    with pytest.raises(CheckpointError, match='local path'):
        CheckpointLoader.load_checkpoint(url)


def test_runner_load_from_refuses(evil, tmp_path):
    runner = toy_runner(tmp_path / 'work', max_iters=2, load_from=evil[0])
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        runner.train()


def test_runner_resume_refuses(evil, tmp_path):
    work_dir = tmp_path / 'work'
    atomic_write(work_dir / 'last_checkpoint', evil[0])
    runner = toy_runner(work_dir, max_iters=4, resume=True)
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        runner.train()


def test_pretrained_init_refuses(evil):
    backbone = PoolFormer(
        arch=dict(layers=[1, 1, 1, 1], embed_dims=[8, 8, 8, 8]),
        init_cfg=dict(type='Pretrained', checkpoint=evil[0]))
    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        backbone.init_weights()
    # mmengine's own PretrainedInit, for modules other than ours
    from mmengine.model import BaseModule

    class Other(BaseModule):

        def __init__(self):
            super().__init__(dict(type='Pretrained', checkpoint=evil[0]))
            self.fc = torch.nn.Linear(2, 2)

    with pytest.raises(UnsafeCheckpointError, match=REFUSED):
        Other().init_weights()


@pytest.mark.slow
def test_tools_refuse(tmp_path, make_tiny_config):
    """tools/test.py and tools/convert_checkpoint.py, as the user runs
    them (one payload: each run costs a process start)."""
    marker = str(tmp_path / 'PWNED')
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'x': ExecPayload(marker)}, path)
    config = make_tiny_config(tmp_path / 'cfg.py')
    for args in (['test.py', config, path],
                 ['convert_checkpoint.py', path, str(tmp_path / 'out.pth')]):
        proc = subprocess.run(
            [sys.executable, osp.join(REPO, 'tools', args[0]), *args[1:]],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, timeout=300)
        assert proc.returncode != 0, proc.stdout[-2000:]
        assert REFUSED in proc.stdout, proc.stdout[-2000:]
        assert not osp.exists(marker)


@pytest.mark.parametrize('how', ['argument', 'environment'])
def test_trust_opt_in_runs_the_pickle(tmp_path, monkeypatch, how):
    """The opt-in is real and as unsafe as documented: the payload runs."""
    marker = str(tmp_path / 'RAN')
    path = str(tmp_path / 'legacy.pth')
    torch.save({'x': ExecPayload(marker), 'w': torch.ones(2)}, path)
    if how == 'environment':
        monkeypatch.setenv(TRUST_ENV, '1')
    with pytest.warns(UserWarning, match='may run arbitrary code'):
        loaded = load(path, trust=how == 'argument')
    assert osp.exists(marker)
    assert torch.equal(loaded['w'], torch.ones(2))


def _globals_in(path):
    with zipfile.ZipFile(path) as archive:
        name = next(n for n in archive.namelist() if n.endswith('data.pkl'))
        data = archive.read(name)
    return {arg for op, arg, _ in pickletools.genops(data)
            if op.name == 'GLOBAL'}


def test_runner_checkpoint_loads_without_getattr(tmp_path):
    """A checkpoint written by training (message hub, optimizer, scheduler,
    RNG state) holds no getattr and loads with weights_only=True."""
    toy_runner(tmp_path, max_iters=2).train()
    path = str(tmp_path / 'iter_2.pth')
    assert not [g for g in _globals_in(path) if 'getattr' in g]
    checkpoint = load(path)
    assert {'meta', 'state_dict', 'optimizer', 'param_schedulers',
            'message_hub', 'rng_state'} <= set(checkpoint)
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer)
    assert np.isfinite(buffer.mean()) and buffer.statistics('current') > 0


def _mmengine_getstate(self):
    """HistoryBuffer.__getstate__ of stock mmengine 0.10.7."""
    self.__dict__.update(statistics_methods=self._statistics_methods)
    return self.__dict__


def test_stock_mmengine_checkpoint_loads(tmp_path, monkeypatch):
    """Checkpoints written without poolformer_seg pickle
    getattr(HistoryBuffer, 'min') etc.; the restricted getattr loads them."""
    hub = MessageHub.get_instance('stock_mmengine_hub')
    hub.update_scalar('train/loss', 1.5)
    hub.update_scalar('train/loss', 0.5)
    monkeypatch.setattr(HistoryBuffer, '__getstate__', _mmengine_getstate)
    path = str(tmp_path / 'stock.pth')
    torch.save({'message_hub': hub.state_dict()}, path)
    monkeypatch.undo()
    assert 'builtins getattr' in _globals_in(path) or \
        '__builtin__ getattr' in _globals_in(path)
    buffer = load(path)['message_hub']['log_scalars']['train/loss']
    assert buffer.mean() == 1.0 and buffer.statistics('min') == 0.5


def test_history_buffer_cannot_swap_class_methods(tmp_path):
    """mmengine's __setstate__ merged a pickled method table into the class;
    ours ignores it, so a file cannot redirect what logging calls."""
    import _codecs
    buffer = HistoryBuffer([1., 2.], [1, 1])
    state = dict(buffer.__dict__, statistics_methods={'mean': _codecs.encode})

    class Crafted:

        def __reduce__(self):
            return HistoryBuffer, (), state

    path = str(tmp_path / 'crafted.pth')
    torch.save({'b': Crafted()}, path)
    loaded = load(path)['b']
    assert HistoryBuffer._statistics_methods['mean'] is HistoryBuffer.mean
    assert loaded.mean() == 1.5


def test_published_weight_formats_load(tmp_path):
    weights = {'w': torch.arange(4.)}
    torch.save(weights, tmp_path / 'plain.pth')
    torch.save({'state_dict': weights, 'meta': {'epoch': 3}},
               tmp_path / 'wrapped.pth')
    from safetensors.torch import save_file
    save_file(weights, str(tmp_path / 'model.safetensors'))
    for name in ('plain.pth', 'model.safetensors'):
        assert torch.equal(load(tmp_path / name)['w'], weights['w'])
    assert load(tmp_path / 'wrapped.pth')['meta'] == {'epoch': 3}


def test_damaged_files_give_clear_errors(tmp_path):
    torch.save({'w': torch.ones(1000)}, tmp_path / 'good.pth')
    data = (tmp_path / 'good.pth').read_bytes()
    (tmp_path / 'cut.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'text.pth').write_bytes(b'not a checkpoint at all' * 10)
    (tmp_path / 'empty.pth').write_bytes(b'')
    for name, reason in (('cut.pth', 'truncated'),
                         ('text.pth', 'not a PyTorch checkpoint'),
                         ('empty.pth', 'empty')):
        path = str(tmp_path / name)
        with pytest.raises(CheckpointError, match=reason) as err:
            load(path)
        assert path in str(err.value)
        assert not isinstance(err.value, UnsafeCheckpointError)
    with pytest.raises(FileNotFoundError, match='missing.pth'):
        load(tmp_path / 'missing.pth')


def test_allowlist_has_no_general_getattr():
    allowed = safe_load.allowed_globals()
    functions = [g[0] if isinstance(g, tuple) else g for g in allowed]
    assert getattr not in functions and eval not in functions
    assert exec not in functions and pickle.loads not in functions


def test_checksums_are_verified_for_paths_and_file_objects(tmp_path):
    """A flipped bit inside a tensor (same length): torch.load alone returns
    the altered value; load refuses, naming the member."""
    import io
    torch.save({'w': torch.arange(1000.)}, tmp_path / 'good.pth')
    data = bytearray((tmp_path / 'good.pth').read_bytes())
    data[data.index(b'data/0') + 400] ^= 0x01
    (tmp_path / 'flip.pth').write_bytes(bytes(data))
    altered = torch.load(tmp_path / 'flip.pth', weights_only=True)['w']
    assert not torch.equal(altered, torch.arange(1000.))  # the hazard
    for source in (str(tmp_path / 'flip.pth'), io.BytesIO(bytes(data))):
        with pytest.raises(safe_load.CorruptCheckpointError,
                           match=r'checksum \(CRC-32\) of its member '
                           r'good/data/0 does not match'):
            load(source)
    buffer = io.BytesIO((tmp_path / 'good.pth').read_bytes())
    buffer.seek(0)
    assert torch.equal(load(buffer)['w'], torch.arange(1000.))


def test_non_finite_weights_load_for_inspection_but_not_into_models(
        tmp_path):
    weights = {'a': torch.ones(3), 'b': torch.tensor([1., float('inf')]),
               'steps': torch.tensor(3)}
    torch.save({'state_dict': weights}, tmp_path / 'inf.pth')
    path = str(tmp_path / 'inf.pth')
    assert torch.isinf(load(path)['state_dict']['b']).any()
    for read in (lambda: CheckpointLoader.load_checkpoint(path),
                 lambda: _load_checkpoint(path)):
        with pytest.raises(safe_load.NonFiniteCheckpointError,
                           match=rf'checkpoint {path} has NaN/Inf values in '
                           r'1 tensor\(s\): b\. '):
            read()
