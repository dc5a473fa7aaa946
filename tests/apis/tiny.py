"""A tiny Semantic FPN + PoolFormer for fast API/tool tests.

``make_tiny_config(path, **TINY_MODEL)`` (the conftest fixture) writes the
quarter-scale S12 config with this 4-block, 8..64-channel backbone and a
16-channel FPN: 150 ADE20K classes, a few hundred thousand parameters.
"""
import torch

from poolformer_seg.apis import init_model

TINY_MODEL = {
    'model.backbone.arch': dict(_delete_=True, layers=[1, 1, 1, 1],
                                embed_dims=[8, 16, 32, 64]),
    'model.neck.in_channels': [8, 16, 32, 64],
    'model.neck.out_channels': 16,
    'model.decode_head.in_channels': [16, 16, 16, 16],
    'model.decode_head.channels': 16,
}


def save_random_checkpoint(config: str, path: str, meta: dict = None,
                           seed: int = 0) -> torch.nn.Module:
    """Initialise the model of ``config`` randomly (``seed``), give its
    BN layers non-trivial running statistics, and save it in mmengine's
    checkpoint layout. Returns the model (CPU, eval)."""
    torch.manual_seed(seed)
    model = init_model(config, device='cpu')
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-.5, .5)
            module.running_var.uniform_(.5, 2.)
    torch.save({'state_dict': model.state_dict(), 'meta': meta or {}}, path)
    return model
