"""An ADE20K dataset that fails on bad data with a clear message.

mmseg's ``ADE20KDataset`` with ``LoadImageFromFile``/``LoadAnnotations``
turns bad data into errors far from their cause (an ``AssertionError``
without advice, an index error in the loss for a label out of range, a
sampler over an empty split) or into silently wrong labels and metrics (a
16-bit annotation wraps around in ``astype(np.uint8)``; ``IoUMetric`` drops
labels >= num_classes without a word). :class:`CheckedADE20KDataset` checks
the files itself and raises :class:`DataError` naming the file and the fix.
The pipelines keep mmseg's standard transforms, so tools that look them up
by name (``mmseg.apis``, ``MMSegInferencer``) work unchanged.

=====================================  =====================================
input                                  behaviour
=====================================  =====================================
data root / split folder missing       ``DataError`` when built
split without images                   ``DataError`` when built
image without annotation               ``DataError`` when built
pipe/device/empty file named *.jpg     ``DataError`` when built
``a.JPG``, ``a.Jpg``, ``a.PNG``        found (suffixes in any case)
``a.jpg`` and ``a.JPG`` side by side   ``DataError`` when built
empty (0-byte) image or annotation     ``DataError`` when the sample loads
truncated JPEG/PNG, not an image       ``DataError`` when the sample loads
corrupt image data                     ``DataError`` when the sample loads
annotation size != image size          ``DataError`` when the sample loads
label > num_classes and not 255        ``DataError`` when the sample loads
multi-channel annotation               ``DataError`` when the sample loads
16-bit annotation                      loads if its values are valid
grayscale / RGBA / 16-bit image        converted to 8-bit BGR (see below)
image smaller than crop or 32 px       works (resized, cropped, padded)
=====================================  =====================================

``LoadImageFromFile`` decodes with OpenCV's ``IMREAD_COLOR``: grayscale is
replicated to 3 channels, the alpha channel of RGBA is dropped and 16-bit
values are scaled to 8 bits (``v >> 8``), so the model always sees 8-bit BGR.
The checks read each annotation once more than the pipeline does (a PNG
decode, about a millisecond) and only the header of each image.
"""
import io
import os
import os.path as osp
import stat
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np
from mmengine import fileio
from mmseg.datasets import ADE20KDataset
from mmseg.registry import DATASETS
from PIL import Image, UnidentifiedImageError

IGNORE_INDEX = 255
_SHOWN = 5  # file names quoted in a message
_EXIF_ORIENTATION = 0x0112
_FIX_FILE = 're-download it or remove it (and its annotation) from the dataset'


class DataError(ValueError):
    """An input file (of a dataset, or given to a tool) is unusable: not a
    regular file, empty, damaged or inconsistent."""


def file_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read as an input file, or None if it can.

    Only regular, non-empty, readable files pass: a named pipe would block
    the reader until something writes to it (forever, in a dataset), a
    device can stream without end, and an empty file makes the image
    decoders fail without naming it.
    """
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return 'is a broken symbolic link' if osp.islink(path) \
            else 'does not exist'
    except OSError as err:
        return f'cannot be examined ({err.strerror})'
    mode = info.st_mode
    kinds = [(stat.S_ISDIR, 'a folder'),
             (stat.S_ISFIFO, 'a named pipe (FIFO), which would block the '
              'reader'),
             (stat.S_ISCHR, 'a character device'),
             (stat.S_ISBLK, 'a block device'),
             (stat.S_ISSOCK, 'a socket')]
    for test, kind in kinds:
        if test(mode):
            return f'is {kind}, not a regular file'
    if not stat.S_ISREG(mode):
        return 'is not a regular file'
    if info.st_size == 0:
        return 'is empty (0 bytes)'
    if not os.access(path, os.R_OK):
        return 'is not readable (permission denied)'
    return None


def _is_local(path: str, backend_args=None) -> bool:
    backend = (backend_args or {}).get('backend', 'local')
    return '://' not in str(path) and backend in ('local', 'local_atomic')


def check_input_file(path: str, what: str = 'image', fix: str = _FIX_FILE,
                     backend_args=None) -> None:
    """Raise unless ``path`` is a regular, non-empty, readable file.

    Files behind a non-local backend (``s3://``...) are not examined.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: any other :func:`file_problem`; the message is
            ``'<what> <path> <problem>; <fix>'``.
    """
    if not _is_local(path, backend_args):
        return
    problem = file_problem(path)
    if problem == 'does not exist':
        raise FileNotFoundError(f'{what} {path} does not exist')
    if problem is not None:
        raise DataError(f'{what} {path} {problem}; {fix}')


def scan_folder(folder: str, suffixes: Sequence[str]
                ) -> Tuple[List[str], List[Tuple[str, str]]]:
    """Files under ``folder`` (recursive, hidden entries left out) whose
    names end in one of ``suffixes``, in any letter case.

    Returns:
        ``(usable, refused)``: sorted paths relative to ``folder`` that pass
        :func:`file_problem`, and ``(path, problem)`` for the matching
        entries that do not (named pipes, devices, empty files...).
    """
    suffixes = tuple(s.lower() for s in suffixes)
    usable, refused = [], []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith('.')]
        for name in names:  # every entry that is not a folder
            if name.startswith('.') or not name.lower().endswith(suffixes):
                continue
            path = osp.join(root, name)
            problem = file_problem(path)
            if problem is None:
                usable.append(osp.relpath(path, folder))
            else:
                refused.append((path, problem))
    return sorted(usable), sorted(refused)


def _quote(paths: List[str]) -> str:
    more = f' (and {len(paths) - _SHOWN} more)' if len(paths) > _SHOWN else ''
    return ', '.join(paths[:_SHOWN]) + more


def _check_complete(data: bytes, path: str) -> None:
    """Reject JPEG/PNG files cut short: some decoders return a partly grey
    image instead of failing."""
    if data[:3] == b'\xff\xd8\xff' and \
            not data.rstrip(b'\x00').endswith(b'\xff\xd9'):
        raise DataError(f'{path} is a truncated JPEG (no end-of-image '
                        f'marker); {_FIX_FILE}')
    if data[:8] == b'\x89PNG\r\n\x1a\n' and b'IEND' not in data[-12:]:
        raise DataError(f'{path} is a truncated PNG (no IEND chunk); '
                        f'{_FIX_FILE}')


def image_size(path: str, backend_args=None) -> Tuple[int, int]:
    """``(H, W)`` of the image as ``LoadImageFromFile`` will decode it.

    Reads only the header. Checks that the file is complete and an image.
    EXIF orientations 5-8 swap H and W, as OpenCV applies them.
    """
    check_input_file(path, 'image', backend_args=backend_args)
    data = fileio.get(path, backend_args=backend_args)
    _check_complete(data, path)
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            # OpenCV rotates JPEGs by their EXIF orientation. (getexif()
            # of other formats may decode the whole image.)
            orientation = image.getexif().get(_EXIF_ORIENTATION, 1) \
                if image.format == 'JPEG' else 1
    except (UnidentifiedImageError, OSError, SyntaxError):
        raise DataError(f'{path} is not a readable image (unknown format or '
                        f'damaged header); {_FIX_FILE}') from None
    return (width, height) if orientation in (5, 6, 7, 8) else (height,
                                                                 width)


def check_annotation(path: str, image_path: str, image_shape, num_classes,
                     reduce_zero_label: bool, backend_args=None) -> None:
    """Check a label map against its image and the classes.

    With ``reduce_zero_label`` (ADE20K) the raw values allowed are 0
    ("other", becomes 255), 1..num_classes (become 0..num_classes - 1) and
    255; without it, 0..num_classes - 1 and 255.
    """
    check_input_file(path, 'annotation', backend_args=backend_args)
    data = fileio.get(path, backend_args=backend_args)
    _check_complete(data, path)
    seg = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if seg is None:
        raise DataError(f'annotation {path} cannot be decoded: the file is '
                        f'corrupt or not an image; {_FIX_FILE}')
    if seg.ndim == 3 and seg.shape[2] > 1:
        raise DataError(
            f'annotation {path} has {seg.shape[2]} channels; it must be a '
            'single-channel label map (one class index per pixel), not a '
            'colour-coded image')
    if tuple(seg.shape[:2]) != tuple(image_shape):
        raise DataError(
            f'annotation {path} is {seg.shape[0]}x{seg.shape[1]} (HxW) but '
            f'its image {image_path} is {image_shape[0]}x{image_shape[1]}; '
            'each annotation must have the size of its image')
    highest = num_classes if reduce_zero_label else num_classes - 1
    bad = (seg > highest) & (seg != IGNORE_INDEX)
    if bad.any():
        values = np.unique(seg[bad])
        shown = ', '.join(str(v) for v in values[:10])
        raise DataError(
            f'annotation {path} has label values [{shown}'
            f'{", ..." if len(values) > 10 else ""}] ({int(bad.sum())} '
            f'pixels) outside the classes: with reduce_zero_label='
            f'{bool(reduce_zero_label)} and {num_classes} classes the valid '
            f'values are 0..{highest} and {IGNORE_INDEX} (ignored)'
            f'{"; 0 is other, also ignored" if reduce_zero_label else ""}. '
            f'Fix the annotation, or map these values to {IGNORE_INDEX}.')


@DATASETS.register_module()
class CheckedADE20KDataset(ADE20KDataset):
    """``ADE20KDataset`` that checks its folders when built and each
    image/annotation pair when it is loaded.

    Same arguments as mmseg's ``ADE20KDataset``; raises :class:`DataError`
    (see the module docstring for the cases).
    """

    def load_data_list(self) -> List[dict]:
        img_dir = self.data_prefix.get('img_path', '')
        ann_dir = self.data_prefix.get('seg_map_path')
        fix = ('Download ADEChallengeData2016 (see docs/training.md), or set '
               'the data_root of the dataset in the config, e.g. '
               '--cfg-options train_dataloader.dataset.data_root=PATH '
               '(tools/make_ade_dataset.py writes a small synthetic one)')
        if self.data_root and not osp.isdir(self.data_root):
            raise DataError(f'data_root {self.data_root!r} does not exist '
                            f'(absolute: {osp.abspath(self.data_root)}). '
                            f'{fix}')
        for folder in (img_dir, ann_dir):
            if folder is not None and not osp.isdir(folder):
                raise DataError(
                    f'dataset folder {folder} does not exist. Expected the '
                    'ADE20K layout images/{training,validation} and '
                    'annotations/{training,validation} under data_root. '
                    f'{fix}')
        data_list = self._list_samples(img_dir, ann_dir) \
            if not self.ann_file and _is_local(img_dir, self.backend_args) \
            else super().load_data_list()
        if not data_list:
            raise DataError(f'no images ending in {self.img_suffix!r} in '
                            f'{img_dir}: this split is empty')
        missing = [info['img_path'] for info in data_list
                   if ann_dir is not None
                   and not osp.isfile(info['seg_map_path'])]
        if missing:
            raise DataError(
                f'{len(missing)} image(s) in {img_dir} have no annotation '
                f'<name>{self.seg_map_suffix} in {ann_dir}: '
                f'{_quote(missing)}. Add the annotations or remove these '
                'images.')
        return data_list

    def _list_samples(self, img_dir: str, ann_dir: Optional[str]
                      ) -> List[dict]:
        """mmseg's listing of a split folder, with two differences: the
        suffixes match in any letter case (``a.JPG`` is found with
        ``img_suffix='.jpg'``, ``a.PNG`` as its annotation), and an entry
        that is not a regular, non-empty file is an error, not skipped."""
        images, refused = scan_folder(img_dir, [self.img_suffix])
        annotations = {}
        if ann_dir is not None:
            found, bad = scan_folder(ann_dir, [self.seg_map_suffix])
            refused += bad
            for name in found:
                annotations.setdefault(name.lower(), []).append(name)
        if refused:
            raise DataError(
                f'{len(refused)} dataset file(s) cannot be read: ' +
                _quote([f'{path} {problem}' for path, problem in refused]) +
                '. Replace them with the real files or remove them')
        stems = {}
        for name in images:
            stems.setdefault(name[:-len(self.img_suffix)].lower(),
                             []).append(name)
        clashes = [' and '.join(osp.join(img_dir, n) for n in names)
                   for names in stems.values() if len(names) > 1]
        if clashes:
            raise DataError(f'images whose names differ only in letter case '
                            f'would share one annotation: {_quote(clashes)}. '
                            'Rename or remove one of each')
        data_list = []
        for name in images:
            info = dict(img_path=osp.join(img_dir, name),
                        label_map=self.label_map,
                        reduce_zero_label=self.reduce_zero_label,
                        seg_fields=[])
            if ann_dir is not None:
                seg_map = name[:-len(self.img_suffix)] + self.seg_map_suffix
                if not osp.isfile(osp.join(ann_dir, seg_map)):
                    seg_map = (annotations.get(seg_map.lower()) or
                               [seg_map])[0]
                info['seg_map_path'] = osp.join(ann_dir, seg_map)
            data_list.append(info)
        return data_list

    def prepare_data(self, idx: int):
        info = self.get_data_info(idx)
        shape = image_size(info['img_path'], self.backend_args)
        if info.get('seg_map_path'):
            check_annotation(info['seg_map_path'], info['img_path'], shape,
                             len(self.metainfo['classes']),
                             self.reduce_zero_label, self.backend_args)
        try:
            return self.pipeline(info)
        except AssertionError as err:
            # mmcv's LoadImageFromFile: `assert img is not None, 'failed to
            # load image: ...'` -- the header was fine, the data is not.
            if 'failed to load image' not in str(err):
                raise
            raise DataError(f'{info["img_path"]} cannot be decoded: the '
                            f'image data is corrupt; {_FIX_FILE}') from None
