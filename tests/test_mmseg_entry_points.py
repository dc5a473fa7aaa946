"""mmseg's own entry points with our configs (issue 15): importable first on
mmcv-lite, and as strict as ours.

Each check runs in a fresh interpreter, so that nothing of poolformer_seg is
imported before mmseg. The ``.pth`` file that installing the package puts
into site-packages is put into a temporary site directory, which the
interpreter processes as ``site`` does site-packages at start-up.
"""
import json
import os
import os.path as osp
import subprocess
import sys
import textwrap

import mmseg
import pytest
import torch

from poolformer_seg import compat
from tests.apis.tiny import TINY_MODEL, save_random_checkpoint
from tests.conftest import REPO
from tests.tools.test_checkpoint_checks import M36_LIKE

MMSEG_TOOLS = osp.join(osp.dirname(mmseg.__file__), '.mim', 'tools')
PTH = 'poolformer_seg_mmcv_lite.pth'


@pytest.fixture(scope='module')
def site_dir(tmp_path_factory):
    """A site directory holding the package's .pth file."""
    folder = tmp_path_factory.mktemp('site')
    with open(osp.join(REPO, PTH)) as src, open(folder / PTH, 'w') as dst:
        dst.write(src.read())
    return str(folder)


@pytest.fixture(scope='module')
def files(make_tiny_config, tmp_path_factory):
    """Tiny config; its checkpoint; one with a 19-class head; an m36-like
    (deeper, wider) one; a 19-class config."""
    root = tmp_path_factory.mktemp('entry_points')
    config = make_tiny_config(root / 'tiny.py', **TINY_MODEL)
    good = str(root / 'good.pth')
    save_random_checkpoint(config, good)
    state = torch.load(good, weights_only=True)
    state['state_dict']['decode_head.conv_seg.weight'] = torch.randn(
        19, 16, 1, 1)
    state['state_dict']['decode_head.conv_seg.bias'] = torch.randn(19)
    torch.save(state, root / 'c19.pth')
    m36_config = make_tiny_config(root / 'm36.py',
                                  **{**TINY_MODEL, **M36_LIKE})
    save_random_checkpoint(m36_config, str(root / 'm36.pth'), seed=1)
    c19_config = make_tiny_config(root / 'c19.py', **TINY_MODEL,
                                  **{'model.decode_head.num_classes': 19})
    return dict(config=config, good=good, c19=str(root / 'c19.pth'),
                m36=str(root / 'm36.pth'), c19_config=c19_config,
                root=str(root))


def run_python(script: str, site_dir: str, **values):
    """Run ``script`` in a new interpreter (repository on the path, the
    site dir processed first); returns its last stdout line as JSON."""
    prelude = f'import site; site.addsitedir({site_dir!r})\n'
    code = prelude + textwrap.dedent(script).format(
        **{k: repr(v) for k, v in values.items()})
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    proc = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


MMSEG_APIS_FIRST = '''
    import json, sys
    from mmseg.apis import MMSegInferencer, init_model  # before ours
    first = not any(name.startswith('poolformer_seg') for name in sys.modules)

    def outcome(load):
        try:
            load()
            return 'loaded'
        except Exception as err:
            return type(err).__name__ + ': ' + str(err)

    config = {config}
    results = dict(first=first)
    for name, path in (('c19', {c19}), ('m36', {m36})):
        results['init_model ' + name] = outcome(
            lambda: init_model(config, path, device='cpu'))
        results['inferencer ' + name] = outcome(
            lambda: MMSegInferencer(config, path, device='cpu'))

    import numpy as np, torch
    from poolformer_seg.apis import init_model as our_init_model, predict_mask
    theirs = init_model(config, {good}, device='cpu')
    saved = torch.load({good}, weights_only=True)['state_dict']
    results['weights equal'] = all(
        torch.equal(theirs.state_dict()[k], v) for k, v in saved.items())
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), np.uint8)
    inferencer = MMSegInferencer(config, {good}, device='cpu')
    labels = inferencer(image, return_datasamples=True).pred_sem_seg.data[0]
    ours = predict_mask(our_init_model(config, {good}, device='cpu'), image)
    results['inferencer labels equal'] = bool(
        (labels.numpy() == ours).all())
    print(json.dumps(results))
'''


@pytest.mark.slow  # a fresh interpreter: 14 s on the 2-core machine
@pytest.mark.skipif(compat.full_mmcv_available(),
                    reason='full mmcv installed: mmseg imports anyway')
def test_mmseg_apis_first_work_and_refuse_what_does_not_fit(site_dir, files):
    results = run_python(MMSEG_APIS_FIRST, site_dir, **files)
    assert results.pop('first'), 'poolformer_seg was imported before mmseg'
    assert results.pop('weights equal')
    assert results.pop('inferencer labels equal')
    for entry, outcome in results.items():
        assert outcome.startswith('CheckpointMismatchError: checkpoint '
                                  "(loaded by mmengine's load_state_dict) "
                                  'does not fit the model'), (entry, outcome)
        if entry.endswith('c19'):
            assert 'decode_head.conv_seg.weight (checkpoint [19, 16, 1, 1], ' \
                'model [150, 16, 1, 1])' in outcome, (entry, outcome)
        else:
            assert 'backbone.stem.proj.weight (checkpoint [12, 3, 7, 7], ' \
                'model [8, 3, 7, 7])' in outcome, (entry, outcome)


def run_mmseg_tool(script, *args):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS='1')
    return subprocess.run(
        [sys.executable, osp.join(MMSEG_TOOLS, script), *map(str, args)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600)


@pytest.mark.slow  # subprocess, 16 s
def test_mmseg_test_tool_refuses_19_classes_on_ade20k(files):
    """mmseg's tools/test.py, our 19-class config, a 19-class checkpoint,
    the 150-class dataset: stops before evaluating."""
    proc = run_mmseg_tool('test.py', files['c19_config'], files['c19'],
                          '--work-dir', osp.join(files['root'], 'w_test'))
    assert proc.returncode != 0
    assert 'ClassCountMismatchError: the class counts disagree: ' \
        'model.decode_head.num_classes=19, the dataset ' \
        'CheckedADE20KDataset has 150 classes' in proc.stdout, \
        proc.stdout[-3000:]
    assert 'Iter(test)' not in proc.stdout


@pytest.mark.slow  # subprocess, 19 s
def test_mmseg_train_tool_stops_on_load_from_another_arch(files):
    proc = run_mmseg_tool(
        'train.py', files['config'], '--work-dir',
        osp.join(files['root'], 'w_train'), '--cfg-options',
        f'load_from={files["m36"]}', 'train_cfg.max_iters=1')
    assert proc.returncode != 0
    assert f'CheckpointMismatchError: checkpoint {files["m36"]} does not ' \
        'fit the model' in proc.stdout, proc.stdout[-3000:]
    assert 'Iter(train)' not in proc.stdout
