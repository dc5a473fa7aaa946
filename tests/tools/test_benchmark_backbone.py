"""tools/analysis/benchmark_backbone.py: ours against timm's MetaFormer.

timm is imported through tests.helpers.timm_ref (behind its torchvision
stand-in), as the other timm tests do; the tool then finds it imported.
"""
import json

import pytest
import torch

from tests.helpers.timm_ref import timm_metaformer

TINY_RUN = ['--batch-size', '1', '--size', '64', '96', '--repeats', '2',
            '--threads', '1']


@pytest.fixture
def tool(load_tool):
    timm_metaformer()
    return load_tool('analysis/benchmark_backbone.py')


def test_times_ours_and_timm_on_equal_weights(tool, tmp_path, capsys):
    out = tmp_path / 'report.json'
    tool.main(['poolformerv2_s12', *TINY_RUN, '--no-compiled-reference',
               '--json', str(out)])
    report = json.loads(out.read_text())
    assert report['input'] == [1, 3, 64, 96]
    assert report['max_feature_difference'] < 1e-5
    assert set(report['modes']) == {'infer', 'train'}
    for rows in report['modes'].values():
        assert list(rows) == ['ours', 'timm']
        for row in rows.values():
            assert 0 < row['min_ms'] <= row['median_ms'] <= row['max_ms']
            assert row['median_over_ours'] == pytest.approx(
                row['median_ms'] / rows['ours']['median_ms'])
    printed = capsys.readouterr().out
    assert '| train | median ms' in printed and '| timm |' in printed


def test_training_rows_update_both_models(tool):
    """The train step learns: both models' weights move."""
    args = tool.parse_args(['poolformerv2_s12', *TINY_RUN])
    timm_model = tool.timm_features_model(args.arch)
    ours = tool.ours_with_weights_of(timm_model, args.arch)
    x = torch.randn(1, 3, 64, 96)
    for model, forward in [(ours, ours.stage_features),
                           (timm_model, timm_model)]:
        before = model.stem.conv.weight.detach().clone()
        tool.make_step(forward, model.train(), 'train', x)()
        assert not torch.equal(before, model.stem.conv.weight)


@pytest.mark.parametrize('arch', ['identityformer_s12', 'convformer_s17'])
def test_archs_timm_does_not_have_are_named(tool, arch):
    with pytest.raises(SystemExit, match=f"arch '{arch}' is not a timm "
                       'MetaFormer; one of: .*caformer_s18'):
        tool.main([arch, *TINY_RUN, '--no-compiled-reference'])


def test_disagreeing_models_are_refused_before_timing(tool, monkeypatch):
    monkeypatch.setattr(tool, 'max_feature_difference', lambda *a: .5)
    monkeypatch.setattr(tool, 'make_step', lambda *a: pytest.fail('timed'))
    with pytest.raises(SystemExit, match='ours and timm disagree'):
        tool.main(['poolformerv2_s12', *TINY_RUN])


def test_compiled_rows_compile_timm_and_ours(tool, tmp_path, monkeypatch):
    """The compiled rows run what ``torch.compile`` returned for timm's model
    and for our ``stage_features``. Dynamo's ``eager`` backend stands in
    for inductor, whose compilation takes minutes here;
    ``test_dynamo_traces_every_mixer_in_one_graph`` checks that ours
    compiles as one graph."""
    compiled, real_compile = [], torch.compile

    def compile_with_eager_backend(fn):
        compiled.append(fn)
        return real_compile(fn, backend='eager')

    monkeypatch.setattr(tool.torch, 'compile', compile_with_eager_backend)
    out = tmp_path / 'report.json'
    tool.main(['poolformerv2_s12', *TINY_RUN, '--modes', 'infer',
               '--compiled-ours', '--json', str(out)])
    rows = json.loads(out.read_text())['modes']['infer']
    assert list(rows) == ['ours', 'timm', 'timm+compile', 'ours+compile']
    assert [type(fn).__name__ for fn in compiled] == ['FeatureListNet',
                                                      'method']
    assert compiled[1].__name__ == 'stage_features'


def test_feature_difference_sees_one_changed_weight(tool):
    """The agreement check compares the two models' outputs: a changed
    weight in timm's last stage shows."""
    timm_model = tool.timm_features_model('poolformerv2_s12').eval()
    ours = tool.ours_with_weights_of(timm_model, 'poolformerv2_s12').eval()
    x = torch.randn(1, 3, 64, 96)
    assert tool.max_feature_difference(ours, timm_model, x) < 1e-5
    with torch.no_grad():
        timm_model.stages_3.blocks[1].mlp.fc2.weight.mul_(1.5)
    assert tool.max_feature_difference(ours, timm_model, x) > 1e-3


def test_scalars_are_drawn_away_from_their_initial_values(tool,
                                                          monkeypatch):
    """The agreement check runs on StarReLU and res scales that are not 1
    and 0 (where folding them is exact whether right or wrong), and still
    finds the two models equal."""
    checked = []
    real = tool.max_feature_difference
    monkeypatch.setattr(tool, 'max_feature_difference', lambda *a: (
        checked.append(a[0]) or real(*a)))
    report = tool.run(tool.parse_args(['poolformerv2_s12', *TINY_RUN,
                                       '--modes', 'infer',
                                       '--no-compiled-reference']))
    params = dict(checked[0].named_parameters())
    act = 'stages.2.blocks.0.mlp.act.'
    assert params[act + 'scale'] != 1 and params[act + 'bias'] != 0
    assert not torch.all(params['stages.2.blocks.0.res_scale1.scale'] == 1)
    assert report['max_feature_difference'] < 1e-5
