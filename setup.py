"""Install poolformer_seg.

The pins are the newest versions that work together (see README,
"Installation"): mmsegmentation 1.2.2 refuses mmcv >= 2.2.0, and torch is
held at 2.13.0, the last release whose headers still build full mmcv 2.1.0
with C++17 for users who want the compiled ops.
"""
from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    'torch==2.13.0',
    'numpy>=2,<3',
    'mmengine==0.10.7',
    # mmcv-lite by default: pure Python, installs in seconds. Full mmcv 2.1.0
    # works too when it is installed (poolformer_seg.compat then does nothing).
    'mmcv-lite==2.1.0',
    'mmsegmentation==1.2.2',
    'ftfy',    # imported by mmseg 1.2.2 but missing from its metadata
    'regex',   # same (open-mmlab/mmsegmentation#3704)
    'opencv-python-headless',
    'Pillow',  # image validation (poolformer_seg/datasets/validation.py)
    'safetensors',
    'matplotlib',
    'tqdm',
]

EXTRAS_REQUIRE = {
    'tests': [
        'pytest',
        'hypothesis',
        'transformers',        # reference PoolFormerModel
        'mmpretrain==1.2.0',   # reference PoolFormer source (no torchvision needed to load the module)
        'onnx',
        'onnxruntime',
        'onnxscript',
    ],
    'deploy': ['onnx', 'onnxruntime', 'onnxscript'],
}

setup(
    name='poolformer_seg',
    version='0.1.0',
    description='PoolFormer backbone and Semantic FPN configs for '
    'MMSegmentation 1.x',
    packages=find_packages(include=['poolformer_seg', 'poolformer_seg.*']),
    python_requires='>=3.10',
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
