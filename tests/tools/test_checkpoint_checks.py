"""Checkpoints that do not fit are refused on every path of the tools
(issue 15): damaged files, NaN weights, another arch, another class count,
``--resume`` from weights only.

The segmentor is the quarter-scale S12 config with the tiny backbone of
``tests/apis/tiny.py`` (150 classes); "m36" stands for a checkpoint of a
deeper and wider arch of the same family (2 blocks per stage, 12..96
channels), which is what an M36 file is to the S12 config. The tools run
in-process (``main(argv)``) and stop before or after one iteration.
"""
import os.path as osp
import types

import pytest
import torch

from poolformer_seg.apis import build_segmentor
from poolformer_seg.engine import ConfigError
from poolformer_seg.utils.loading import (CheckpointMismatchError,
                                          check_class_count,
                                          ClassCountMismatchError)
from poolformer_seg.utils.safe_load import (CheckpointError,
                                            CorruptCheckpointError,
                                            NonFiniteCheckpointError)
from tests.apis.tiny import TINY_MODEL, save_random_checkpoint

M36_LIKE = {
    'model.backbone.arch': dict(_delete_=True, layers=[2, 2, 2, 2],
                                embed_dims=[12, 24, 48, 96]),
    'model.neck.in_channels': [12, 24, 48, 96],
}
ONE_ITER = {'train_cfg.val_interval': 100, 'val_cfg': None,
            'val_dataloader': None, 'val_evaluator': None,
            'default_hooks.checkpoint.interval': 1}


@pytest.fixture(scope='module')
def tiny(make_tiny_config, tmp_path_factory):
    """(config, checkpoint, folder): the tiny segmentor, random weights."""
    root = tmp_path_factory.mktemp('checks')
    config = make_tiny_config(root / 'tiny.py', **TINY_MODEL)
    checkpoint = str(root / 'tiny.pth')
    save_random_checkpoint(config, checkpoint)
    return config, checkpoint, root


@pytest.fixture(scope='module')
def m36_like(tiny, make_tiny_config):
    _, _, root = tiny
    config = make_tiny_config(root / 'm36.py', **{**TINY_MODEL, **M36_LIKE})
    checkpoint = str(root / 'm36.pth')
    save_random_checkpoint(config, checkpoint, seed=1)
    return checkpoint


@pytest.fixture(scope='module')
def nineteen(tiny, make_tiny_config):
    """(config, checkpoint) of the tiny segmentor with a 19-class head; the
    checkpoint records 19 class names."""
    _, _, root = tiny
    config = make_tiny_config(root / 'c19.py', **TINY_MODEL,
                              **{'model.decode_head.num_classes': 19})
    torch.manual_seed(2)
    # built from the model part alone: the whole config (a 19-class head on
    # the 150-class dataset) is what the tools refuse
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS
    init_default_scope('mmseg')
    model = MODELS.build(Config.fromfile(config).model)
    model.init_weights()
    meta = dict(dataset_meta=dict(classes=tuple(f'c{i}' for i in range(19)),
                                  palette=[[i, i, i] for i in range(19)]))
    checkpoint = str(root / 'c19.pth')
    torch.save({'state_dict': model.state_dict(), 'meta': meta}, checkpoint)
    return config, checkpoint


def _edited(checkpoint, path, edit):
    state = torch.load(checkpoint, weights_only=True)
    edit(state['state_dict'])
    torch.save(state, path)
    return str(path)


def flip_bits_in_a_tensor(src, dst):
    """Same length, one byte of a tensor's data changed: the zip's CRC of
    that member no longer matches (the file still unpickles)."""
    data = bytearray(open(src, 'rb').read())
    index = data.index(b'data/0') + 200  # inside the first tensor's bytes
    data[index] ^= 0x10
    open(dst, 'wb').write(bytes(data))
    return str(dst)


def test_nan_head_weights_are_refused_by_test_tool(tiny, load_tool,
                                                   tmp_path):
    config, checkpoint, _ = tiny

    def poison(state):
        state['decode_head.conv_seg.weight'][3, 0] = float('nan')
        state['decode_head.conv_seg.bias'][0] = float('inf')

    bad = _edited(checkpoint, tmp_path / 'nan.pth', poison)
    with pytest.raises(NonFiniteCheckpointError) as err:
        load_tool('test.py').main([config, bad, '--work-dir',
                                   str(tmp_path / 'w')])
    assert f'checkpoint {bad} has NaN/Inf values in 2 tensor(s): ' \
        'decode_head.conv_seg.weight, decode_head.conv_seg.bias' in \
        str(err.value)


def test_flipped_bits_are_refused_by_test_tool(tiny, load_tool, tmp_path):
    config, checkpoint, _ = tiny
    bad = flip_bits_in_a_tensor(checkpoint, tmp_path / 'flipped.pth')
    assert osp.getsize(bad) == osp.getsize(checkpoint)
    with pytest.raises(CorruptCheckpointError,
                       match=r'is corrupt: the checksum \(CRC-32\) of its '
                       r'member \S+/data/0 does not match'):
        load_tool('test.py').main([config, bad, '--work-dir',
                                   str(tmp_path / 'w')])


def test_19_class_model_on_150_class_dataset_is_refused(nineteen, load_tool,
                                                        tmp_path):
    config, checkpoint = nineteen
    # the config check refuses the head against the dataset before the
    # checkpoint is read
    with pytest.raises(ConfigError) as err:
        load_tool('test.py').main([config, checkpoint, '--work-dir',
                                   str(tmp_path / 'w')])
    message = str(err.value)
    assert 'model.decode_head.num_classes=19' in message
    assert 'CheckedADE20KDataset) has 150 classes' in message


def test_checkpoint_of_another_class_list_is_refused(nineteen, load_tool,
                                                     tmp_path,
                                                     make_tiny_config):
    """A 19-class checkpoint with a head config and dataset that agree
    (19 classes): the checkpoint's own class list must agree too."""
    _, checkpoint = nineteen
    classes = tuple(f'k{i}' for i in range(150))
    config = make_tiny_config(tmp_path / 'cfg.py', **TINY_MODEL)
    state = torch.load(checkpoint, weights_only=False)
    state['meta']['dataset_meta']['classes'] = classes[:19]
    dataset = types.SimpleNamespace(metainfo={'classes': classes})
    with pytest.raises(ClassCountMismatchError) as err:
        check_class_count(build_segmentor(config), dataset, state, checkpoint)
    message = str(err.value)
    assert 'model.decode_head.num_classes=150' in message
    assert 'meta.dataset_meta.classes: 19 (k0, k1, k2, ...)' in message


def train(load_tool, config, work_dir, *options, resume=False):
    argv = [config, '--work-dir', str(work_dir), '--cfg-options',
            *options]
    return load_tool('train.py').main(argv + (['--resume'] if resume
                                              else []))


@pytest.mark.slow
def test_load_from_another_arch_stops_training(tiny, m36_like, load_tool,
                                               tmp_path, make_tiny_config):
    config = make_tiny_config(tmp_path / 'cfg.py', max_iters=1,
                              **TINY_MODEL, **ONE_ITER)
    with pytest.raises(CheckpointMismatchError) as err:
        train(load_tool, config, tmp_path / 'w', f'load_from={m36_like}')
    message = str(err.value)
    assert f'checkpoint {m36_like} does not fit the model' in message
    assert 'backbone.stem.proj.weight (checkpoint [12, 3, 7, 7], model ' \
        '[8, 3, 7, 7])' in message
    assert 'unexpected backbone keys' in message
    assert 'backbone.stages.0.blocks.1.norm1.weight' in message
    assert not osp.exists(tmp_path / 'w' / 'iter_1.pth')


@pytest.mark.slow
def test_load_from_with_another_head_fine_tunes_and_says_so(
        nineteen, load_tool, tmp_path, make_tiny_config):
    """The 19-class checkpoint into the 150-class config: the head keeps
    its initialisation, the rest loads, training runs."""
    _, checkpoint = nineteen
    config = make_tiny_config(tmp_path / 'cfg.py', max_iters=1,
                              **TINY_MODEL, **ONE_ITER)
    work_dir = tmp_path / 'w'
    train(load_tool, config, work_dir, f'load_from={checkpoint}')
    log = open(next(work_dir.glob('*/*.log'))).read()
    assert f'fine-tuning from {checkpoint}: 2 head tensors do not fit ' \
        'this model (another class count or head) and keep their ' \
        'initialisation: decode_head.conv_seg.weight, ' \
        'decode_head.conv_seg.bias' in log
    assert osp.isfile(work_dir / 'iter_1.pth')


@pytest.mark.slow
@pytest.mark.parametrize('kind', ['weights only', 'converted'])
def test_resume_from_a_non_training_checkpoint_is_clear(
        tiny, load_tool, tmp_path, make_tiny_config, kind):
    config, checkpoint, _ = tiny
    if kind == 'converted':
        source = checkpoint
        checkpoint = str(tmp_path / 'converted.pth')
        load_tool('convert_checkpoint.py').main([source, checkpoint])
    config = make_tiny_config(tmp_path / 'cfg.py', max_iters=1,
                              **TINY_MODEL, **ONE_ITER)
    with pytest.raises(CheckpointError) as err:
        train(load_tool, config, tmp_path / 'w', f'load_from={checkpoint}',
              resume=True)
    message = str(err.value)
    what = ('a checkpoint converted by tools/convert_checkpoint.py'
            if kind == 'converted' else 'weights only')
    assert f'cannot resume from {checkpoint}: it is not a training ' \
        f'checkpoint ({what}; it lacks meta.iter, meta.epoch, message_hub)' \
        in message
    assert f'set load_from={checkpoint}' in message
    assert 'without --resume' in message


def _backbone_file(tiny, tmp_path):
    """The tiny segmentor's backbone as a pretrained-weights file."""
    _, checkpoint, _ = tiny
    state = torch.load(checkpoint, weights_only=True)['state_dict']
    path = str(tmp_path / 'backbone.pth')
    torch.save({'state_dict': {k[len('backbone.'):]: v for k, v in
                               state.items() if k.startswith('backbone.')}},
               path)
    return path


def _every_path(tiny, load_tool, tmp_path):
    """name -> function(checkpoint file) for each way a file is loaded."""
    from mmengine.runner import load_checkpoint

    from poolformer_seg import PoolFormer
    from poolformer_seg.apis import init_model
    from poolformer_seg.utils.loading import load_pretrained
    config = tiny[0]
    arch = dict(layers=[1, 1, 1, 1], embed_dims=[8, 16, 32, 64])
    return {
        'apis.init_model': lambda f: init_model(config, f, device='cpu'),
        'mmengine load_checkpoint (load_from, mmseg init_model)':
            lambda f: load_checkpoint(build_segmentor(config), f),
        'pretrained init': lambda f: load_pretrained(PoolFormer(arch=arch),
                                                     f),
        'converter': lambda f: load_tool('convert_checkpoint.py').main(
            [f, str(tmp_path / 'out.pth')]),
    }


@pytest.mark.parametrize('damage', ['flipped bits', 'NaN'])
def test_every_load_path_refuses_damaged_or_nan_files(tiny, load_tool,
                                                      tmp_path, damage):
    for name, load_file in _every_path(tiny, load_tool, tmp_path).items():
        source = _backbone_file(tiny, tmp_path) if name == \
            'pretrained init' else tiny[1]
        if damage == 'flipped bits':
            bad = flip_bits_in_a_tensor(source, tmp_path / 'bad.pth')
            expected = 'is corrupt: the checksum'
        else:
            def poison(state):
                key = next(iter(state))
                # flattened in memory order: fast-path weights are
                # channels_last
                state[key] = state[key].contiguous()
                state[key].view(-1)[0] = float('nan')
            bad = _edited(source, tmp_path / 'bad.pth', poison)
            expected = 'has NaN/Inf values in 1 tensor(s)'
        with pytest.raises((CheckpointError, SystemExit)) as err:
            load_file(bad)
        assert expected in str(err.value), name
        assert not osp.exists(tmp_path / 'out.pth'), name
