"""Install poolformer_seg into an existing MMSegmentation 1.x environment.

``install_requires`` states the ranges the code supports, so that installing
the plugin never replaces a user's torch, mmcv or mmengine. The exact set that
CI tests is ``constraints.txt`` (``scripts/setup_env.sh`` installs with
``-c constraints.txt``).

mmcv is not required here, because two distributions provide the ``mmcv``
package and pip cannot express "either": users of full mmcv (2.0 or 2.1,
compiled ops) keep theirs; everyone else installs the ``lite`` extra
(``pip install -e ".[lite]"``), pure Python. ``poolformer_seg`` says so at
import time when neither is there. mmsegmentation 1.2.x refuses mmcv >= 2.2.

On mmcv-lite, mmseg cannot be imported before ``poolformer_seg`` replaces
``mmcv.ops``; ``poolformer_seg_mmcv_lite.pth`` (copied to the root of
site-packages by :class:`BuildPyWithPth`) registers the stand-in at
interpreter start, so that ``from mmseg.apis import init_model`` works first.
It imports only the standard library until ``mmcv.ops`` is imported.
"""
import os

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

PTH = 'poolformer_seg_mmcv_lite.pth'


class BuildPyWithPth(build_py):
    """build_py that also puts the ``.pth`` at the top of the wheel (which
    pip installs into site-packages, where ``site`` runs it)."""

    def run(self):
        super().run()
        self.copy_file(PTH, os.path.join(self.build_lib, PTH))

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [
            os.path.join(self.build_lib, PTH)]

INSTALL_REQUIRES = [
    'torch>=2.1',
    'numpy>=1.24',
    'mmengine>=0.10.0,<1.0',
    'mmsegmentation>=1.2.0,<1.3',
    'ftfy',    # imported by mmseg 1.2.2 but missing from its metadata
    'regex',   # same (open-mmlab/mmsegmentation#3704)
    'Pillow',  # image validation (poolformer_seg/datasets/validation.py)
    'safetensors',
    'matplotlib',
    'tqdm',
]

EXTRAS_REQUIRE = {
    'lite': ['mmcv-lite>=2.0.0,<2.2.0'],
    'tests': [
        'pytest',
        'hypothesis',
        'transformers',        # reference PoolFormerModel
        'mmpretrain>=1.2.0',   # reference PoolFormer source (loaded without torchvision)
        'onnx',
        'onnxruntime',
        'onnxscript',
    ],
    'deploy': ['onnx', 'onnxruntime', 'onnxscript'],
}

setup(
    name='poolformer_seg',
    version='0.1.0',
    description='PoolFormer and MetaFormer backbones with Semantic FPN '
    'configs for MMSegmentation 1.x',
    packages=find_packages(include=['poolformer_seg', 'poolformer_seg.*']),
    py_modules=['_poolformer_seg_mmcv_lite'],
    cmdclass={'build_py': BuildPyWithPth},
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
