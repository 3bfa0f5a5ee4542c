"""COCO box / mask AP (AP@[.5:.95], AP50, AP75) via pycocotools' ``COCOeval``.

:func:`coco_from_dataset` builds the ground truth as an in-memory COCO object from any dataset of this package
(in the dataset's frame, i.e. after ``img_size`` resizing), so PennFudanPed and COCO subsets are evaluated the
same way. Predicted masks are thresholded at 0.5 and RLE-encoded with ``pycocotools.mask``.

Evaluation happens in the label space of the dataset's targets, which is the model's: a detection's ``label`` is
its ``category_id``, and the ground truth's categories are the dataset's ``categories`` (``{'id': label, ...}``).
With ``CocoDetectionDataset(label_space='coco_ids')`` (torchvision's COCO detectors, the paper's Table 6) labels
*are* the COCO category ids, gaps included: COCOeval scores the categories of the ground truth, and detections of
ids the dataset does not annotate are not counted, as in the official COCO evaluation.
"""
import contextlib
import io
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch

__all__ = ['coco_from_dataset', 'dataset_categories', 'predictions_to_coco', 'coco_ap', 'evaluate']

_STAT_NAMES = ('AP', 'AP50', 'AP75')


def _rle(mask: np.ndarray) -> Dict:
    from pycocotools import mask as mask_util
    r = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    r['counts'] = r['counts'].decode('ascii')
    return r


def coco_from_dataset(dataset, indices: Optional[Iterable[int]] = None, with_masks: bool = True):
    """Ground truth of ``dataset[i]`` (``(img, target)``) for ``i in indices`` as a pycocotools ``COCO``."""
    from pycocotools.coco import COCO
    indices = range(len(dataset)) if indices is None else indices
    images, anns, labels = [], [], set()
    for i in indices:
        img, t = dataset[i]
        h, w = img.shape[-2:]
        img_id = int(t['image_id'])
        images.append({'id': img_id, 'height': int(h), 'width': int(w)})
        for j in range(t['boxes'].shape[0]):
            x1, y1, x2, y2 = [float(v) for v in t['boxes'][j]]
            lab = int(t['labels'][j])
            labels.add(lab)
            a = {'id': len(anns) + 1, 'image_id': img_id, 'category_id': lab, 'bbox': [x1, y1, x2 - x1, y2 - y1],
                 'area': (x2 - x1) * (y2 - y1), 'iscrowd': int(t['iscrowd'][j]) if 'iscrowd' in t else 0}
            if with_masks and 'masks' in t:
                m = t['masks'][j].numpy()
                a['segmentation'] = _rle(m)
                a['area'] = float(m.sum())
            anns.append(a)
    cats = dataset_categories(dataset, labels)
    coco = COCO()
    coco.dataset = {'images': images, 'annotations': anns, 'categories': cats}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def dataset_categories(dataset, labels=()) -> List[Dict]:
    """The evaluation's categories: ``dataset.categories`` (``[{'id': label, 'name': ...}]``) when the dataset has
    them, else ``1 .. num_classes - 1`` (or up to the largest of ``labels``)."""
    cats = getattr(dataset, 'categories', None)
    if cats is not None:
        return [{'id': int(c['id']), 'name': str(c.get('name', c['id']))} for c in cats]
    num = getattr(dataset, 'num_classes', None) or max(labels, default=1) + 1
    return [{'id': c, 'name': str(c)} for c in range(1, int(num))]


def predictions_to_coco(image_id: int, output: Dict[str, torch.Tensor], with_masks: bool = True) -> List[Dict]:
    """torchvision detector output for one image -> COCO result dicts (``segmentation`` when masks exist)."""
    res = []
    boxes = output['boxes'].detach().cpu()
    scores = output['scores'].detach().cpu()
    labels = output['labels'].detach().cpu()
    masks = output.get('masks') if with_masks else None
    if masks is not None:
        masks = (masks.detach().cpu()[:, 0] > 0.5).numpy()
    for k in range(boxes.shape[0]):
        x1, y1, x2, y2 = [float(v) for v in boxes[k]]
        r = {'image_id': int(image_id), 'category_id': int(labels[k]), 'bbox': [x1, y1, x2 - x1, y2 - y1],
             'score': float(scores[k])}
        if masks is not None:
            r['segmentation'] = _rle(masks[k])
        res.append(r)
    return res


def coco_ap(coco_gt, results: List[Dict], iou_type: str = 'bbox') -> Dict[str, float]:
    """AP, AP50, AP75 (fractions in [0, 1]) from COCOeval; all zero when there are no results."""
    from pycocotools.cocoeval import COCOeval
    if not results:
        return {k: 0.0 for k in _STAT_NAMES}
    with contextlib.redirect_stdout(io.StringIO()):
        dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [max(0.0, float(s)) for s in ev.stats[:3]]  # COCOeval reports -1 for "no GT"
    return dict(zip(_STAT_NAMES, stats))


@torch.no_grad()
def evaluate(model, loader, coco_gt, device='cpu', with_masks: bool = True) -> Dict[str, float]:
    """Run ``model`` (eval mode) over ``loader`` (``(images, targets)`` batches) and return
    ``{'box_AP', 'box_AP50', 'box_AP75'[, 'mask_AP', ...]}`` as percentages."""
    was_training = model.training
    model.eval()
    results = []
    for images, targets in loader:
        outs = model([im.to(device) for im in images])
        for t, o in zip(targets, outs):
            results.extend(predictions_to_coco(int(t['image_id']), o, with_masks))
    model.train(was_training)
    out = {f'box_{k}': 100.0 * v for k, v in coco_ap(coco_gt, results, 'bbox').items()}
    if with_masks:
        seg = [r for r in results if 'segmentation' in r]
        out.update({f'mask_{k}': 100.0 * v for k, v in coco_ap(coco_gt, seg, 'segm').items()})
    return out
