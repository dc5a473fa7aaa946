"""The tools stop before work starts on a contradictory or unreadable
config, with an error of one or two lines that names the file or key and
the fix; ``--debug`` / ``POOLFORMER_SEG_DEBUG=1`` show the traceback."""
import shutil

import pytest

from poolformer_seg.engine import ConfigError, run_tool
from tests.apis.tiny import TINY_MODEL, save_random_checkpoint


@pytest.fixture(scope='module')
def train(load_tool):
    return load_tool('train.py')


@pytest.fixture(scope='module')
def tiny_config(make_tiny_config, tmp_path_factory):
    return make_tiny_config(tmp_path_factory.mktemp('cfg') / 'tiny.py')


def fails(tool, argv, capsys):
    """Run ``tool.main(argv)`` as the command line does; return stderr."""
    with pytest.raises(SystemExit) as stop:
        run_tool(tool.main, [str(a) for a in argv])
    assert stop.value.code == 1
    # In-process, mmengine's loggers may keep handlers on the streams of
    # earlier tests and complain on stderr; the tool's own output is the
    # last two lines (test_command_line_prints_no_traceback checks that
    # nothing else is printed in a real run).
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) >= 2 and lines[-2].startswith('error: '), lines[-20:]
    assert lines[-1] == ('(run with --debug or POOLFORMER_SEG_DEBUG=1 for '
                         'the traceback)')
    assert 'Traceback' not in '\n'.join(lines[-2:])
    return lines[-2]


def test_top_level_key_typo_has_did_you_mean(train, tiny_config, tmp_path,
                                             capsys):
    config = tmp_path / 'typo.py'
    config.write_text(open(tiny_config).read() +
                      '\ntrain_cfgg = dict(max_iters=2)\n')
    error = fails(train, [config, '--work-dir', tmp_path], capsys)
    assert error.startswith(f"error: ConfigError: unknown top-level config "
                            f"key 'train_cfgg' in {config} (did you mean "
                            f"'train_cfg'?)")


def test_num_classes_smaller_than_the_dataset(train, tiny_config, tmp_path,
                                              capsys):
    error = fails(train, [tiny_config, '--work-dir', tmp_path,
                          '--cfg-options',
                          'model.decode_head.num_classes=19'], capsys)
    assert ('model.decode_head.num_classes=19 but train_dataloader.dataset '
            '(CheckedADE20KDataset) has 150 classes') in error
    assert '--cfg-options model.decode_head.num_classes=150' in error


def test_out_indices_do_not_match_neck_in_channels(train, tiny_config,
                                                   tmp_path, capsys):
    error = fails(train, [tiny_config, '--work-dir', tmp_path,
                          '--cfg-options',
                          'model.backbone.out_indices=[1,2,3]'], capsys)
    assert ('model.neck.in_channels=[64, 128, 320, 512] does not match the '
            "backbone: model.backbone (PoolFormer, arch='s12') with "
            'out_indices=(1, 2, 3) returns 3 feature maps with [128, 320, '
            '512] channels') in error


@pytest.mark.parametrize('broken', ['config', 'base'])
def test_config_syntax_error_names_file_and_line(train, tiny_config,
                                                 tmp_path, capsys, broken):
    bad = tmp_path / 'bad.py'
    bad.write_text('crop_size = (128, 128)\n\nmodel = dict(type="X"\n')
    config = bad
    if broken == 'base':
        config = tmp_path / 'child.py'
        config.write_text(f"_base_ = ['{bad}']\n")
    error = fails(train, [config, '--work-dir', tmp_path], capsys)
    assert error.startswith(f'error: ConfigError: config {bad}, line 3: '
                            "syntax error: '(' was never closed"), error


def test_debug_flag_and_variable_show_the_traceback(train, tmp_path,
                                                    monkeypatch, capsys):
    bad = tmp_path / 'bad.py'
    bad.write_text('x = (\n')
    with pytest.raises(ConfigError, match=f'config {bad}, line 1'):
        run_tool(train.main, [str(bad), '--debug'])
    monkeypatch.setenv('POOLFORMER_SEG_DEBUG', '1')
    with pytest.raises(ConfigError, match=f'config {bad}, line 1'):
        run_tool(train.main, [str(bad)])


@pytest.mark.slow
def test_command_line_prints_no_traceback(run_tool, tmp_path):
    """The real command: exit status 1, two lines on stderr, nothing on
    stdout (no environment dump), no traceback."""
    bad = tmp_path / 'bad.py'
    bad.write_text('model = dict(\n')
    proc = run_tool('train.py', bad, check=False, merge_stderr=False,
                    timeout=120)
    assert proc.returncode == 1
    assert 'Traceback' not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f'error: ConfigError: config {bad}, line 1')
    assert len(lines) == 2 and proc.stdout == ''


@pytest.mark.slow
def test_zero_byte_annotation_through_train_and_test(train, load_tool,
                                                     make_tiny_config,
                                                     ade_tiny, tmp_path,
                                                     capsys):
    """An empty annotation PNG in a split: one line naming it (it was an
    OpenCV assertion without a path), in training and in tools/test.py."""
    root = tmp_path / 'ade'
    shutil.copytree(ade_tiny, root)
    empty = sorted((root / 'annotations' / 'validation').iterdir())[0]
    empty.write_bytes(b'')
    options = {f'{loader}.dataset.data_root': str(root) for loader in (
        'train_dataloader', 'val_dataloader', 'test_dataloader')}
    config = make_tiny_config(tmp_path / 'cfg.py', **TINY_MODEL, **options)
    # training validates on the broken split
    train_args = [config, '--work-dir', tmp_path / 'w', '--cfg-options',
                  'train_cfg.val_interval=1']
    checkpoint = tmp_path / 'tiny.pth'
    save_random_checkpoint(config, str(checkpoint))
    test = load_tool('test.py')
    for tool, argv in ((train, train_args),
                       (test, [config, checkpoint, '--work-dir',
                               tmp_path / 't'])):
        error = fails(tool, argv, capsys)
        assert error == (f'error: DataError: 1 dataset file(s) cannot be '
                         f'read: {empty} is empty (0 bytes). Replace them '
                         'with the real files or remove them'), error
