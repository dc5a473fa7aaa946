"""``model.test_cfg.compile``: when inference runs through ``torch.compile``,
that it computes what eager inference computes, and that one compilation
serves every image size.

A tiny S12-layout segmentor (8..16 channels, one block per stage) keeps the
compilations short; they are still a minute or more each on a small CPU
(inductor: several minutes cold, see the note on the slow test), so the
tests that compile are marked slow. Those that check how the model is
wired (guards, copies, impl='plain') use dynamo with its ``eager`` backend:
the same tracing and guards, without code generation.
"""
import copy
import functools

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from torch._dynamo.utils import counters

import poolformer_seg  # noqa: F401
from poolformer_seg.engine import config_check
from poolformer_seg.engine.config_check import ConfigError
from poolformer_seg.models.segmentors import rowwise_encoder_decoder as rowwise
from poolformer_seg.models.segmentors.rowwise_encoder_decoder import (
    compile_decision, check_compile_setting)
from tests.conftest import S12_CONFIG
from tests.helpers.upstream import randomize_

TINY = {
    'model.backbone.arch': dict(_delete_=True, layers=[1, 1, 1, 1],
                                embed_dims=[8, 16, 16, 16]),
    'model.neck.in_channels': [8, 16, 16, 16],
    'model.neck.out_channels': 8,
    'model.decode_head.in_channels': [8] * 4,
    'model.decode_head.channels': 8,
    'model.decode_head.num_classes': 5,
    'model.data_preprocessor.size': None,  # the images as they are
}
# none a multiple of 32
SIZES = [(70, 90), (100, 132), (64, 200), (94, 98)]


UNSET = object()


def tiny_config(impl='fast', compile=UNSET):
    cfg = Config.fromfile(S12_CONFIG)
    cfg.merge_from_dict({**TINY, 'model.impl': impl})
    cfg.model.backbone.init_cfg = None
    if compile is not UNSET:
        cfg.model.test_cfg['compile'] = compile
    return cfg


def tiny_model(impl='fast', compile=UNSET, seed=0):
    init_default_scope('mmseg')
    model = revert_sync_batchnorm(MODELS.build(
        tiny_config(impl, compile).model))
    with torch.no_grad():
        randomize_(model, seed)
    return model.eval()


def batch_of(height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), generator=gen,
                          dtype=torch.uint8)
    sample = SegDataSample(metainfo=dict(
        ori_shape=(height, width), img_shape=(height, width),
        pad_shape=(height, width), padding_size=[0, 0, 0, 0]))
    return dict(inputs=[image], data_samples=[sample])


def eager(model):
    """The model's logits function without compiling."""
    return functools.partial(rowwise._logits, model)


@pytest.fixture
def fresh_dynamo():
    """No compiled code, counts or log settings left from an earlier
    test."""
    rowwise._compiled_logits.cache_clear()
    torch._dynamo.reset()
    counters.clear()
    yield
    rowwise._compiled_logits.cache_clear()
    torch._dynamo.reset()
    torch._logging.set_logs()


@pytest.fixture
def dynamo_only(fresh_dynamo, monkeypatch):
    """The model's own ``torch.compile`` call, with dynamo's ``eager``
    backend: tracing, guards and recompilations as with inductor, in
    seconds."""
    monkeypatch.setattr(rowwise.torch, 'compile', functools.partial(
        torch.compile, backend='eager'))


def compiled_frames():
    return counters['frames']['ok']


# ----------------------------------------------------------------------------
# the setting


@pytest.mark.parametrize('value', ['yes', 'true', 1, None, 'cuda'])
def test_unknown_setting_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=r'model\.test_cfg\.compile='):
        tiny_model(compile=value)
    with pytest.raises(ConfigError, match=r'model\.test_cfg\.compile='):
        config_check.check_compile_setting(tiny_config(compile=value))


def test_setting_on_a_segmentor_that_ignores_it_is_refused():
    cfg = tiny_config(compile=True)
    cfg.model.type = 'EncoderDecoder'
    cfg.model.pop('impl')
    with pytest.raises(ConfigError, match=r'model\.test_cfg\.compile=True '
                                          r"but model\.type='EncoderDecoder'"):
        config_check.check_compile_setting(cfg)
    for harmless in ('auto', False):  # what EncoderDecoder does anyway
        cfg.model.test_cfg['compile'] = harmless
        config_check.check_compile_setting(cfg)


def test_the_configs_say_auto():
    assert Config.fromfile(S12_CONFIG).model.test_cfg == dict(
        mode='whole', compile='auto')


def test_auto_compiles_on_cuda_only():
    for value in ('auto', True, False):
        assert check_compile_setting(value) is value
    assert compile_decision('auto', 'cuda') is True
    assert compile_decision('auto', torch.device('cuda', 1)) is True
    assert compile_decision('auto', 'cpu') is False
    assert compile_decision('auto', 'meta') is False
    assert compile_decision(True, 'cpu') is True
    assert compile_decision(False, 'cuda') is False


def test_model_compiles_only_when_set_true_in_eval_without_grad():
    """``compiles()``: a model with ``'auto'`` never compiles itself, even
    with its parameters on CUDA (a fake CUDA parameter, no GPU needed):
    ``init_model`` decides that. True compiles in eval mode without
    gradients only."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
    model = tiny_model()
    with torch.no_grad():
        assert not model.compiles()  # auto, CPU
        name = next(n for n, _ in model.named_parameters())
        owner, attr = model.get_submodule(name.rsplit('.', 1)[0]), \
            name.rsplit('.', 1)[1]
        weight = getattr(owner, attr)
        fake = FakeTensor(FakeTensorMode(), weight.detach().to('meta'),
                          torch.device('cuda'))
        owner._parameters[attr] = torch.nn.Parameter(fake)
        assert not model.compiles()  # auto, CUDA
    forced = tiny_model(compile=True)
    with torch.no_grad():
        assert forced.compiles()
        forced.train()
        assert not forced.compiles()
        forced.eval()
    assert not forced.compiles()  # gradients enabled


def test_auto_never_compiles_on_cpu(fresh_dynamo):
    model = tiny_model()
    with torch.no_grad():
        model(torch.randn(1, 3, 70, 90), mode='tensor')
        model.test_step(batch_of(66, 98))
    assert counters['frames']['total'] == 0


def test_training_is_never_compiled(fresh_dynamo):
    from mmengine.structures import PixelData
    model = tiny_model(compile=True).train()
    batch = batch_of(64, 96)
    batch['data_samples'][0].gt_sem_seg = PixelData(
        data=torch.randint(0, 5, (1, 64, 96)))
    losses = model.loss(torch.randn(1, 3, 64, 96), batch['data_samples'])
    sum(v for k, v in losses.items() if 'loss' in k).backward()
    with torch.no_grad():  # eval, but gradients on: eager too
        model.eval()
    model(torch.randn(1, 3, 64, 96), mode='tensor')
    assert counters['frames']['total'] == 0


def test_init_model_compile_argument(tmp_path, make_tiny_config,
                                     fresh_dynamo, monkeypatch):
    from poolformer_seg.apis import inference_model, init_model
    from tests.apis.tiny import TINY_MODEL
    config = make_tiny_config(tmp_path / 'tiny.py', **TINY_MODEL)
    assert Config.fromfile(config).model.test_cfg.compile == 'auto'
    model = init_model(config, device='cpu', compile=False)
    assert model.test_cfg['compile'] is False and not model.training
    assert model.impl == 'fast'
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3),
                                              dtype=np.uint8)
    result = inference_model(model, image)
    assert result.pred_sem_seg.data.shape == (1, 70, 90)
    assert counters['frames']['total'] == 0
    assert init_model(config, device='cpu').test_cfg['compile'] == 'auto'
    # on CUDA 'auto' becomes True (the move to CUDA left out: no GPU)
    moved, to = [], torch.nn.Module.to

    def to_cuda_stays(self, *args, **kwargs):
        if args == ('cuda', ):
            moved.append('cuda')
            return self
        return to(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, 'to', to_cuda_stays)
    assert init_model(config, device='cuda').test_cfg['compile'] is True
    assert init_model(config, device='cuda',
                      compile=False).test_cfg['compile'] is False
    assert moved == ['cuda', 'cuda']
    monkeypatch.undo()
    assert init_model(config, device='cpu',
                      compile=True).test_cfg['compile'] is True
    with pytest.raises(ValueError, match=r'model\.test_cfg\.compile='):
        init_model(config, device='cpu', compile='sometimes')


# ----------------------------------------------------------------------------
# compiled inference


@pytest.mark.slow
def test_compiled_inference_equals_eager_and_compiles_once(fresh_dynamo):
    """Inductor, as deployed: logits equal to eager to 1e-5 through
    ``mode='tensor'`` and ``test_step`` at four sizes that are not
    multiples of 32, and one compilation for all of them (dynamic shapes;
    without ``dynamic=True`` dynamo compiles twice: static, then dynamic at
    the second size). The first compilation of even this tiny model takes
    1-5 minutes on a loaded 2-core CPU (inductor caches generated code in
    its temporary directory, so a rerun is quicker)."""
    model = tiny_model(compile=True)
    reference = tiny_model(compile=False)
    with torch.no_grad():
        for height, width in SIZES:
            x = torch.randn(1, 3, height, width)
            got = model(x, mode='tensor')
            torch.testing.assert_close(got, eager(model)(x), atol=1e-5,
                                       rtol=0)
            # the 7x7 stride-4 stem with padding 2
            assert got.shape == (1, 5, (height - 3) // 4 + 1,
                                 (width - 3) // 4 + 1)
            compiled, = model.test_step(batch_of(height, width))
            plain, = reference.test_step(batch_of(height, width))
            assert compiled.pred_sem_seg.data.shape == (1, height, width)
            # labels can differ where two classes tie to fp32 rounding
            same = (compiled.pred_sem_seg.data ==
                    plain.pred_sem_seg.data).float().mean()
            assert same > 0.999
    assert compiled_frames() == 1
    assert counters['stats']['unique_graphs'] == 1
    assert not counters['graph_break']


@pytest.mark.slow
def test_deep_copy_of_a_compiled_model_runs_its_own_weights(dynamo_only):
    model = tiny_model(compile=True)
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        before = model(x, mode='tensor')
        clone = copy.deepcopy(model)
        randomize_(clone, seed=1)
        got = clone(x, mode='tensor')
        torch.testing.assert_close(got, eager(clone)(x), atol=1e-5, rtol=0)
        assert not torch.allclose(got, before, atol=1e-3)
        torch.testing.assert_close(model(x, mode='tensor'), before,
                                   atol=0, rtol=0)
    assert compiled_frames() >= 1
    # nothing compiled is held by the model or saved with it
    assert model.state_dict().keys() == tiny_model().state_dict().keys()
    assert not any('_orig_mod' in key for key in clone.state_dict())


@pytest.mark.slow
@pytest.mark.parametrize('impl', ['fast', 'plain'])
def test_compiled_path_has_no_graph_break_and_one_graph(impl, dynamo_only):
    """Dynamo traces the whole tensor part in one graph (no break) for
    both ``impl`` s, and four sizes need at most two compilations: one, plus
    (NCHW, the plain path) one more when the inputs cross the size at which
    PyTorch's convolution picks another memory layout for its output, a
    guard on the size rather than on its value."""
    model = tiny_model(impl, compile=True)
    with torch.no_grad():
        for height, width in SIZES:
            x = torch.randn(1, 3, height, width)
            torch.testing.assert_close(model(x, mode='tensor'),
                                       eager(model)(x), atol=1e-5, rtol=0)
            model.test_step(batch_of(height, width))
    assert 1 <= compiled_frames() <= 2
    assert not counters['graph_break']


def test_tools_option_gives_a_bool():
    """``--cfg-options model.test_cfg.compile=False`` (tools/test.py,
    tools/inference.py) reaches the model as the bool False."""
    import argparse

    from mmengine.config import DictAction
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    for text, value in (('False', False), ('True', True), ('auto', 'auto')):
        options = parser.parse_args(
            ['--cfg-options', f'model.test_cfg.compile={text}']).cfg_options
        cfg = tiny_config()
        cfg.merge_from_dict(options)
        config_check.check_compile_setting(cfg)
        setting = tiny_model(compile=cfg.model.test_cfg.compile
                             ).compile_setting
        assert setting == value and type(setting) is type(value)
