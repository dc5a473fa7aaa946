"""tools/inference.py on generated ADE20K-layout images (tiny random model:
these tests check files, sizes and colours, not segmentation quality)."""
import glob
import os
import os.path as osp
import shutil

import cv2
import numpy as np
import pytest

import poolformer_seg  # noqa: F401
from mmseg.datasets import ADE20KDataset
from poolformer_seg.apis import colorize_mask, init_model, predict_mask
from poolformer_seg.engine import run_tool

from tests.apis.tiny import TINY_MODEL, save_random_checkpoint
from tests.helpers.hang_guard import hang_guard

PALETTE = np.array(ADE20KDataset.METAINFO['palette'], np.uint8)


def read_rgb(path):
    return cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope='module')
def photos(ade_tiny, tmp_path_factory):
    """Two generated validation images, one in a sub-folder."""
    root = tmp_path_factory.mktemp('photos')
    images = sorted(glob.glob(osp.join(ade_tiny, 'images', 'validation',
                                       '*.jpg')))[:2]
    os.makedirs(root / 'sub')
    shutil.copy(images[0], root / 'a.jpg')
    shutil.copy(images[1], root / 'sub' / 'b.jpg')
    (root / 'notes.txt').write_text('not an image')
    return str(root)


@pytest.fixture(scope='module')
def tiny(make_tiny_config, tmp_path_factory):
    root = tmp_path_factory.mktemp('tiny_tool')
    config = make_tiny_config(root / 'tiny.py', **TINY_MODEL)
    checkpoint = str(root / 'tiny.pth')
    save_random_checkpoint(config, checkpoint)
    return config, checkpoint


@pytest.fixture(scope='module')
def tool_output(tiny, photos, run_tool, tmp_path_factory):
    out = str(tmp_path_factory.mktemp('inference_out'))
    proc = run_tool('inference.py', *tiny, photos, '--out-dir', out,
                    '--opacity', '0.4', '--panel', '--device', 'cpu')
    return out, proc.stdout


@pytest.mark.slow
def test_writes_mask_overlay_legend_per_image(tool_output, photos):
    out, stdout = tool_output
    assert 'wrote 8 files for 2 image(s)' in stdout
    assert sorted(osp.relpath(p, out) for p in glob.glob(
        osp.join(out, '**', '*.png'), recursive=True)) == [
            'a_legend.png', 'a_mask.png', 'a_overlay.png', 'a_panel.png',
            'sub/b_legend.png', 'sub/b_mask.png', 'sub/b_overlay.png',
            'sub/b_panel.png']
    for name in ('a', 'sub/b'):
        photo = read_rgb(osp.join(photos, f'{name}.jpg'))
        mask = read_rgb(osp.join(out, f'{name}_mask.png'))
        overlay = read_rgb(osp.join(out, f'{name}_overlay.png'))
        assert mask.shape == overlay.shape == photo.shape
        # every pixel of the mask is an ADE20K palette colour
        colours = np.unique(mask.reshape(-1, 3), axis=0)
        assert all((PALETTE == c).all(axis=1).any() for c in colours)
        # opacity 0.4 blend of the photo (as decoded) and the mask
        expected = 0.6 * photo + 0.4 * mask.astype(float)
        assert np.abs(overlay - expected).max() <= 1.
        panel = read_rgb(osp.join(out, f'{name}_panel.png'))
        # photo | 8 px gap | overlay | 8 px gap | legend (300 px)
        height, width = photo.shape[:2]
        assert panel.shape[0] >= height
        assert panel.shape[1] == 2 * width + 16 + 300
        np.testing.assert_array_equal(panel[:height, :width], photo)
        np.testing.assert_array_equal(
            panel[:height, width + 8:2 * width + 8], overlay)


def test_outputs_agree_with_the_api(tool_output, tiny, photos):
    out, _ = tool_output
    model = init_model(*tiny, device='cpu')
    labels = predict_mask(model, osp.join(photos, 'a.jpg'))
    assert len(np.unique(labels)) > 1
    mask = read_rgb(osp.join(out, 'a_mask.png'))
    np.testing.assert_array_equal(mask, colorize_mask(labels, PALETTE))
    # the legend shows a swatch for each class present, largest first
    legend = read_rgb(osp.join(out, 'a_legend.png'))
    present = np.argsort(-np.bincount(labels.ravel(), minlength=150),
                         kind='stable')[:len(np.unique(labels))]
    swatch_centres = legend[4 + 10 + 28 * np.arange(len(present)), 16]
    np.testing.assert_array_equal(swatch_centres, PALETTE[present])


def test_glob_and_single_file_inputs(load_tool, photos):
    tool = load_tool('inference.py')
    found, skipped = tool.collect_images(osp.join(photos, '**', '*.jpg'))
    assert [name for _, name in found] == ['a', 'sub/b'] and skipped == []
    assert tool.collect_images(osp.join(photos, 'sub', 'b.jpg')) == ([
        (osp.join(photos, 'sub', 'b.jpg'), 'b')], [])
    with pytest.raises(FileNotFoundError, match='no usable image files'):
        tool.collect_images(osp.join(photos, '*.png'))


@pytest.fixture
def odd_folder(photos, tmp_path):
    """a.jpg, an upper-case B.JPG, a named pipe c.jpg, an empty d.png, an
    e.png that is not an image."""
    folder = tmp_path / 'odd'
    folder.mkdir()
    shutil.copy(osp.join(photos, 'a.jpg'), folder / 'a.jpg')
    shutil.copy(osp.join(photos, 'sub', 'b.jpg'), folder / 'B.JPG')
    os.mkfifo(folder / 'c.jpg')
    (folder / 'd.png').write_bytes(b'')
    (folder / 'e.png').write_bytes(b'not a PNG')
    return folder


def test_folder_with_named_pipe_does_not_hang(load_tool, tiny, odd_folder,
                                              tmp_path, capsys):
    """The named pipe, the empty file and the undecodable one are skipped,
    each with a warning naming it; the others (B.JPG included) are
    segmented; exit status 1, listing the skipped ones."""
    tool = load_tool('inference.py')
    out = tmp_path / 'out'
    with hang_guard(), pytest.raises(SystemExit) as stop:
        run_tool(tool.main, [*tiny, str(odd_folder), '--out-dir', str(out),
                             '--device', 'cpu'])
    assert stop.value.code == 1
    captured = capsys.readouterr()
    assert 'wrote 6 files for 2 image(s)' in captured.out
    assert sorted(os.listdir(out)) == [
        'B_legend.png', 'B_mask.png', 'B_overlay.png', 'a_legend.png',
        'a_mask.png', 'a_overlay.png']
    lines = captured.err.strip().splitlines()
    assert lines[0] == (f'warning: skipped {odd_folder}/c.jpg: it is a named '
                        'pipe (FIFO), which would block the reader, not a '
                        'regular file')
    assert lines[1] == (f'warning: skipped {odd_folder}/d.png: it is empty '
                        '(0 bytes)')
    assert (f'warning: skipped {odd_folder}/e.png: input image '
            f'{odd_folder}/e.png cannot be decoded: it is damaged or not an '
            'image') in lines  # amid the progress bar's lines
    error, = [line for line in lines if line.startswith('error:')]
    assert error.startswith('error: DataError: 3 of 5 inputs were skipped')


@pytest.mark.parametrize('kind', ['pipe', 'empty', 'not an image'])
def test_unusable_input_file_is_refused_with_its_path(load_tool, tiny,
                                                      tmp_path, capsys, kind):
    tool = load_tool('inference.py')
    path = tmp_path / 'photo.jpg'
    if kind == 'pipe':
        os.mkfifo(path)
    else:
        path.write_bytes(b'' if kind == 'empty' else b'GIF? no')
    with hang_guard(), pytest.raises(SystemExit) as stop:
        run_tool(tool.main, [*tiny, str(path), '--out-dir',
                             str(tmp_path / 'out'), '--device', 'cpu'])
    assert stop.value.code == 1
    expected = {'pipe': 'is a named pipe (FIFO)', 'empty': 'is empty',
                'not an image': 'cannot be decoded'}[kind]
    # the error line, whatever warnings the imports printed before it
    error, = [line for line in capsys.readouterr().err.splitlines()
              if line.startswith('error:')]
    assert error.startswith(f'error: DataError: input image {path} '
                            f'{expected}'), error


def test_bad_opacity_is_rejected(load_tool, capsys):
    with pytest.raises(SystemExit):
        load_tool('inference.py').parse_args(['c.py', 'k.pth', 'x.jpg',
                                              '--opacity', '1.5'])
    assert '--opacity must be in [0, 1]' in capsys.readouterr().err


def test_one_pass_tool_keeps_auto_eager(load_tool, tiny, photos,
                                        monkeypatch, tmp_path):
    """The tool runs each image once: a config's ``'auto'`` reaches
    ``init_model`` as ``compile=False`` (which would otherwise compile on
    CUDA), an explicit True or False as the config's (None)."""
    tool = load_tool('inference.py')
    seen = []

    def init_model(*args, compile=None, **kwargs):
        seen.append(compile)
        return real(*args, compile=compile, **kwargs)
    real = tool.init_model
    monkeypatch.setattr(tool, 'init_model', init_model)
    image = osp.join(photos, 'a.jpg')
    base = [*tiny, image, '--device', 'cpu']
    tool.main(base + ['--out-dir', str(tmp_path / 'a')])
    tool.main(base + ['--out-dir', str(tmp_path / 'b'), '--cfg-options',
                      'model.test_cfg.compile=False'])
    assert seen == [False, None]
    parsed = tool.parse_args(base + ['--cfg-options',
                                     'model.test_cfg.compile=True'])
    assert tool.one_pass_compile(parsed) is None
