"""sail-sg/metaformer checkpoints written from timm ones, for the tests.

The inverse of timm 1.0's ``checkpoint_filter_fn`` (which converts the
original sail-sg checkpoints into timm's names), written independently of
:mod:`poolformer_seg.utils.metaformer_layouts` from the sail-sg source
(``metaformer_baselines.py``): the stem and the three downsamplings are
``downsample_layers.{i}`` (the stem's norm is ``post_norm``, the others'
``pre_norm``), blocks are ``stages.{i}.{j}``, pointwise layers are
``nn.Linear`` (2-D weights), the final norm is ``norm`` and the classifier
``head`` (an ``nn.Linear``, or ``MlpHead`` with ``fc1``/``norm``/``fc2``).
"""
import re

_POINTWISE = re.compile(r'\.(mlp\.fc[12]|token_mixer\.pwconv[12])\.weight$')


def _sailsg_name(key: str) -> str:
    if key.startswith('stem.conv.'):
        return 'downsample_layers.0.conv.' + key[len('stem.conv.'):]
    if key.startswith('stem.norm.'):
        return 'downsample_layers.0.post_norm.' + key[len('stem.norm.'):]
    m = re.match(r'stages\.(\d+)\.downsample\.(norm|conv)\.(.+)$', key)
    if m:
        part = 'pre_norm' if m[2] == 'norm' else 'conv'
        return f'downsample_layers.{m[1]}.{part}.{m[3]}'
    m = re.match(r'stages\.(\d+)\.blocks\.(\d+)\.(.+)$', key)
    if m:
        return f'stages.{m[1]}.{m[2]}.{m[3]}'
    if key.startswith('head.norm.'):
        return 'norm.' + key[len('head.norm.'):]
    if key.startswith('head.fc.'):
        return 'head.' + key[len('head.fc.'):]
    raise KeyError(f'no sail-sg name for timm key {key!r}')


def sailsg_from_timm(state_dict: dict) -> dict:
    """A timm ``MetaFormer`` classifier state dict in sail-sg's layout."""
    out = {}
    for key, value in state_dict.items():
        if _POINTWISE.search(key) and value.dim() == 4:
            value = value.flatten(1)  # 1x1 conv -> nn.Linear
        out[_sailsg_name(key)] = value.clone()
    return out
