"""tools/benchmark.py: report structure, agreement check, outputs.

Timings are not checked (they depend on the machine); the structure of the
report, the output-agreement check against the mmpretrain reference and the
Markdown/plot/JSON files are. Small inputs, one or two runs each.
"""
import json

import matplotlib.image
import pytest
import torch

from tests.conftest import S12_CONFIG

@pytest.fixture(scope='module')
def bench(load_tool):
    return load_tool('benchmark.py')


@pytest.fixture(scope='module')
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp('bench')
    argv = [S12_CONFIG, '--sizes', '64x64', '96x80', '--batch-sizes', '1',
            '--dtype', 'fp32', 'bf16', '--modes', 'infer', 'train',
            '--repeats', '2', '--warmup', '0', '--threads', '1',
            '--no-memory', '--no-compiled-reference', '--no-peak',
            '--agreement-inputs', '2', '--json', str(out / 'r.json'),
            '--markdown', str(out / 'r.md'), '--plot', str(out / 'r.png')]
    bench.main(argv)
    with open(out / 'r.json') as f:
        return json.load(f), out


def test_report_has_every_variant_with_medians_and_ratios(report):
    data, _ = report
    records = data['records']
    keys = {(r['mode'], tuple(r['size']), r['model'], r['dtype'])
            for r in records}
    assert len(records) == len(keys) == 2 * 2 * 2 * 2
    for r in records:
        assert len(r['times_ms']) == 2
        assert r['median_ms'] > 0 and r['min_ms'] <= r['median_ms']
        assert r['images_per_s'] == pytest.approx(1e3 / r['median_ms'])
        ref = next(q for q in records if q['model'] == 'reference'
                   and q['dtype'] == 'fp32' and q['mode'] == r['mode']
                   and q['size'] == r['size'])
        assert r['speedup_vs_ref_fp32'] == pytest.approx(
            ref['median_ms'] / r['median_ms'])
    env = data['environment']
    assert env['impl'] == 'fast' and env['threads'] == 1
    assert {(s['model'], s['dtype'], s['mode']) for s in data['scaling']} \
        == {(m, d, mode) for m in ('ours', 'reference')
            for d in ('fp32', 'bf16') for mode in ('infer', 'train')}


def test_agreement_with_reference_and_fp32(report):
    data, _ = report
    assert [c['size'] for c in data['agreement']] == [[64, 64], [96, 80]]
    for check in data['agreement']:
        assert check['inputs'] == 2
        results = check['results']
        ours = results['ours/fp32']
        assert ours['max_abs_diff_to_reference'] < 1e-4
        assert ours['max_abs_logit'] > 1  # not a vacuous comparison
        assert ours['argmax_equal_to_reference'] > .999
        for variant in ('ours/bf16', 'reference/bf16',
                        'reference/bf16-operands'):
            share = results[variant]['argmax_equal_to_fp32']
            assert .9 < share <= 1
            assert results[variant]['argmax_equal_to_fp32_worst_input'] \
                <= share
            assert results[variant]['max_abs_diff_to_fp32'] > 0


def test_agreement_over_several_inputs_gives_mean_worst_and_largest(bench):
    """Shares are averaged (the inputs have the same size) and the worst
    input kept; maxima stay maxima, means means."""
    found = [dict(argmax_equal_to_fp32=.99, max_abs_diff_to_fp32=1.,
                  mean_abs_diff_to_reference=2.),
             dict(argmax_equal_to_fp32=.96, max_abs_diff_to_fp32=3.,
                  mean_abs_diff_to_reference=4.)]
    assert bench._combined(found) == pytest.approx(dict(
        argmax_equal_to_fp32=.975, argmax_equal_to_fp32_worst_input=.96,
        max_abs_diff_to_fp32=3., mean_abs_diff_to_reference=3.))


def test_agreement_inputs_must_be_positive(bench):
    with pytest.raises(SystemExit):
        bench.parse_args([S12_CONFIG, '--agreement-inputs', '0'])


def test_markdown_and_plot_files(report):
    data, out = report
    text = (out / 'r.md').read_text()
    assert '| mode | size | batch | model | dtype | median ms |' in text
    assert text.count('| infer | 64x64 | 1 |') == 4
    assert '## Output agreement' in text and '## Cost against pixels' in text
    assert '| 64x64 | 1 | 2 | ours/bf16 | argmax_equal_to_fp32 |' in text
    # the allocator setting changes both routes' times: always stated
    assert 'huge pages (THP_MEM_ALLOC_ENABLE, both routes): ' in text
    assert data['environment']['command'].startswith(
        'python tools/benchmark.py')
    image = matplotlib.image.imread(str(out / 'r.png'))
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0


def test_each_round_takes_the_steps_in_a_new_order(bench):
    """A step that runs after one that freed much memory pays for it: a
    fixed order, or a rotated one, would always charge the same step."""
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in 'abcd'}
    times = bench.time_interleaved(steps, repeats=8, warmup=1, device='cpu')
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]
    assert len(rounds) == 8 and all(sorted(r) == list('abcd') for r in rounds)
    for name in 'abcd':  # preceded by different steps within the rounds
        before = {r[r.index(name) - 1] for r in rounds if r[0] != name}
        assert len(before) > 1
    assert all(len(times[name][0]) == 8 for name in 'abcd')


def test_ablation_rows_flip_one_optimisation_and_report_peak(
        bench, tmp_path, narrow_s12_config, monkeypatch):
    """``--ablations`` adds a row per hand-written optimisation, run inside
    a patch that flips its switch (and restores it): ``ours-no-winograd``
    where this CPU runs Winograd, ``ours+winograd`` where it does not;
    every row reports its fraction of the measured matrix-product peak."""
    from poolformer_seg.models import winograd
    others = ['ours-no-compose', 'ours-no-compose-head',
              'ours-no-onednn-linear', 'ours-no-keep-weights',
              'ours-no-hand-backward', 'ours-no-blockwise-loss',
              'ours-no-separable-resize']
    for on, row in ((True, 'ours-no-winograd'), (False, 'ours+winograd')):
        monkeypatch.setattr(winograd, 'ON_THIS_CPU', on)
        assert list(bench.ablation_rows()) == [row] + others
        seen = []
        real = bench.make_step
        monkeypatch.setattr(bench, 'make_step', lambda *a, **k: (
            lambda: seen.append(winograd.ON_THIS_CPU)))
        bench.variant_step({'ours': None}, row, 'infer', 'fp32', None, None,
                           'cpu')()
        monkeypatch.setattr(bench, 'make_step', real)
        assert seen == [not on] and winograd.ON_THIS_CPU is on
    from poolformer_seg.models import resize, utils
    from poolformer_seg.models.backbones import fast_ops
    from poolformer_seg.models.decode_heads import fast_head
    from poolformer_seg.models.necks import fast_fpn
    switches = ((fast_fpn, 'COMPOSE_FINEST'), (fast_fpn, 'COMPOSE_HEAD'),
                (fast_ops, 'ONEDNN_LINEAR'), (utils, 'KEEP_DERIVED'),
                (fast_ops, 'HAND_WRITTEN_BACKWARD'),
                (fast_head, 'BLOCKWISE_LOSS'), (resize, 'SEPARABLE_ON_CPU'))
    for row, (owner, name) in zip(others, switches):
        seen = []
        monkeypatch.setattr(bench, 'make_step', lambda *a, **k: (
            lambda: seen.append(getattr(owner, name))))
        bench.variant_step({'ours': None}, row, 'infer', 'fp32', None, None,
                           'cpu')()
        monkeypatch.setattr(bench, 'make_step', real)
        assert seen == [False] and getattr(owner, name) is True
    out = tmp_path / 'a.json'
    bench.main([narrow_s12_config, '--sizes', '64x64', '--dtype', 'fp32',
                '--modes', 'infer', '--repeats', '1', '--warmup', '0',
                '--threads', '1', '--no-memory', '--no-compiled-reference',
                '--ablations', '--json', str(out)])
    data = json.loads(out.read_text())
    # hand-backward and blockwise-loss act in training only
    inference_rows = others[:4] + others[6:]
    assert [r['model'] for r in data['records']] == [
        'ours', 'ours+winograd', *inference_rows, 'reference']
    assert data['environment']['matmul_peak_gflops']['fp32'] > 0
    for r in data['records']:
        assert r['peak_fraction'] > 0 and r['first_call_s'] > 0


def test_ablation_rows_are_those_that_act_in_the_mode(bench):
    """Inference runs no backward and no loss, training keeps no derived
    weights: each mode gets the rows whose switch acts in it."""
    def names(mode):
        return [r.split('-no-')[-1].split('+')[-1]
                for r in bench.ablation_rows(mode)]
    shared = ['winograd', 'compose', 'compose-head', 'onednn-linear']
    assert names('infer') == shared + ['keep-weights', 'separable-resize']
    assert names('train') == shared + ['hand-backward', 'blockwise-loss']
    args = bench.parse_args([S12_CONFIG, '--ablations', '--dtype', 'fp32'])
    assert [n for n, _ in bench.variants(args, 'train')] == [
        'ours', *bench.ablation_rows('train'), 'reference',
        'reference+compile']


@pytest.mark.slow
def test_compiled_reference_row_reports_its_compile_time(
        bench, tmp_path, narrow_s12_config):
    """The upstream route through torch.compile is a row of its own, its
    compilation in the first-call column, and ours gets a ratio to it."""
    out = tmp_path / 'c.json'
    bench.main([narrow_s12_config, '--sizes', '64x64', '--dtype', 'fp32',
                '--modes', 'infer', '--repeats', '1', '--warmup', '1',
                '--threads', '1', '--no-memory', '--no-peak', '--json',
                str(out)])
    records = {r['model']: r for r in json.loads(out.read_text())['records']}
    assert list(records) == ['ours', 'reference', 'reference+compile']
    compiled = records['reference+compile']
    # the first call compiled: far slower than a compiled call
    assert compiled['first_call_s'] > 10 * compiled['median_ms'] / 1e3
    assert records['ours']['speedup_vs_compiled'] == pytest.approx(
        compiled['median_ms'] / records['ours']['median_ms'])


@pytest.mark.slow
def test_agreement_check_catches_different_weights(bench):
    """The check compares real outputs: perturbed weights are caught."""
    args = bench.parse_args([S12_CONFIG, '--threads', '1'])
    models = bench.build_pair(args, 'cpu')
    with torch.no_grad():
        models['reference'].backbone.network[0][0].layer_scale_1.mul_(1.5)
    images, samples = bench.make_inputs(1, (64, 64), 150, 'cpu', 0)
    result = bench.agreement(models, [(images, samples)], ['fp32'], 'cpu')
    assert result['ours/fp32']['max_abs_diff_to_reference'] > 1e-2


def test_ours_is_the_fast_config_and_plain_is_one_option(bench):
    """No flags: the config as it is (fast); model.impl=plain: plain."""
    fast = bench.build_segmentor(bench.model_config(
        bench.parse_args([S12_CONFIG])))
    assert fast.backbone.stages[0].blocks[0].fused
    assert type(fast.decode_head).__name__ == 'FastFPNHead'
    args = bench.parse_args([S12_CONFIG, '--cfg-options', 'model.impl=plain'])
    assert bench.ours_impl(args) == 'plain'
    plain = bench.build_segmentor(bench.model_config(args))
    assert not plain.backbone.stages[0].blocks[0].fused
    assert type(plain.decode_head).__name__ == 'FPNHead'


@pytest.mark.parametrize('native_bf16', [True, False])
def test_bf16_is_timed_by_default_only_where_it_is_native(
        bench, monkeypatch, capsys, native_bf16):
    """On an AVX2-only CPU, bf16 is emulated: a 512x512 reference step takes
    many minutes, so the default leaves it out and says so."""
    monkeypatch.setattr(bench.compat, 'cpu_computes_natively',
                        lambda dtype: native_bf16 or dtype == torch.float32)
    assert bench.parse_args([S12_CONFIG]).dtype == \
        (['fp32', 'bf16'] if native_bf16 else ['fp32'])
    assert ('bf16 left out' in capsys.readouterr().err) != native_bf16
    asked = bench.parse_args([S12_CONFIG, '--dtype', 'fp32', 'bf16'])
    assert asked.dtype == ['fp32', 'bf16']
    warned = 'warning: --dtype bf16 is emulated' in capsys.readouterr().err
    assert warned != native_bf16


def test_reference_is_mmseg_as_built_by_mmseg(bench):
    """The reference's neck and head are mmseg's exact classes, built by
    mmseg: none of FastFPNHead's ConvModule settings (efficient conv-bn
    eval) carry over, and the weights are ours."""
    from mmcv.cnn import ConvModule
    from mmseg.models.decode_heads import FPNHead
    from mmseg.models.necks import FPN
    args = bench.parse_args([S12_CONFIG, '--threads', '1'])
    models = bench.build_pair(args, 'cpu')
    ours, ref = models['ours'], models['reference']
    assert type(ref.neck) is FPN and type(ref.decode_head) is FPNHead
    assert type(ref.backbone).__module__ == '_mmpretrain_backbones.poolformer'
    convs = [m for m in ref.modules() if isinstance(m, ConvModule)]
    assert convs and all(m.efficient_conv_bn_eval_forward is None
                         for m in convs)
    assert type(ours.decode_head).__name__ == 'FastFPNHead'
    for name, value in ref.decode_head.state_dict().items():
        assert torch.equal(value, ours.decode_head.state_dict()[name]), name


def test_reference_of_a_metaformer_config_is_the_plain_build(bench):
    """A MetaFormer UPerNet config: the reference has mmseg's UPerHead and
    FCNHead and our MetaFormer in NCHW (timm's function), with ours'
    weights; ours has the fast heads and a channels_last backbone."""
    from mmseg.models.decode_heads import FCNHead, UPerHead

    from poolformer_seg.models import FastFCNHead, FastUPerHead, MetaFormer
    from tests.conftest import REPO
    config = f'{REPO}/configs/upernet_convformer_s18_ade20k.py'
    args = bench.parse_args([config, '--threads', '1', '--cfg-options',
                             'model.decode_head.channels=16',
                             'model.auxiliary_head.channels=8'])
    models = bench.build_pair(args, 'cpu')
    ours, ref = models['ours'], models['reference']
    assert (type(ours.decode_head), type(ours.auxiliary_head)) == (
        FastUPerHead, FastFCNHead)
    assert (type(ref.decode_head), type(ref.auxiliary_head)) == (
        UPerHead, FCNHead)
    assert type(ref.backbone) is MetaFormer
    assert (ours.backbone.impl, ref.backbone.impl) == ('fast', 'plain')
    for name, value in ref.state_dict().items():
        assert torch.equal(value, ours.state_dict()[name]), name


class _TinySegmentor(torch.nn.Module):
    """conv -> ReLU -> classifier, under the classifier's mmseg name."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.decode_head = torch.nn.Module()
        self.decode_head.conv_seg = torch.nn.Conv2d(8, 5, 1)

    def encode_decode(self, images, metas):
        return self.decode_head.conv_seg(self.conv(images).relu())


def test_bf16_operand_floor_rounds_the_operands_only(bench):
    """The floor equals the hand-written product of bf16-rounded operands,
    keeps the classifier exact and gives the weights back bit for bit."""
    model = _TinySegmentor()
    images = torch.randn(2, 3, 16, 16) * 3
    weights = {k: v.clone() for k, v in model.state_dict().items()}

    def to_bf16(t):
        return t.bfloat16().float()
    with torch.no_grad():
        expected = model.decode_head.conv_seg(torch.nn.functional.conv2d(
            to_bf16(images), to_bf16(model.conv.weight), model.conv.bias,
            padding=1).relu())
        exact = model.encode_decode(images, None)
    floor = bench.bf16_operand_logits(model, images, None)
    torch.testing.assert_close(floor, expected, rtol=0, atol=1e-6)
    assert (floor - exact).abs().max() > 1e-4  # something was rounded
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key]), key
    assert not model.conv._forward_pre_hooks


@pytest.mark.slow
def test_memory_probe_reports_peak(run_tool, tmp_path):
    out = tmp_path / 'm.json'
    run_tool('benchmark.py', S12_CONFIG, '--sizes', '64x64', '--dtype',
             'fp32', '--modes', 'train', '--repeats', '1', '--warmup', '0',
             '--threads', '1', '--no-reference', '--json', out)
    (record, ) = json.loads(out.read_text())['records']
    assert record['model'] == 'ours'
    assert 0 < record['peak_delta_mb'] < record['peak_mb']


@pytest.mark.slow
def test_bad_size_is_rejected(run_tool):
    proc = run_tool('benchmark.py', S12_CONFIG, '--sizes', '512', check=False)
    assert proc.returncode == 2 and 'HEIGHTxWIDTH' in proc.stdout
