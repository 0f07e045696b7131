"""`pasam_segmentation`: mean IoU and mean boundary IoU of binary object masks, per subset (HQSeg-44K protocol).

An `evaluate` metric module shipped inside pasam_hf. Load it offline with
`pasam_hf.metrics.load_evaluate_metric()` or `evaluate.load("<path to this file>")`. The scores come from
`pasam_hf.metrics` (mask IoU and boundary IoU of Cheng et al., 2021, mean of the subset means).
"""

import datasets
import evaluate
import numpy as np

from pasam_hf.metrics import SegmentationMetrics

_CITATION = """\
@inproceedings{cheng2021boundary,
  title={Boundary IoU: Improving Object-Centric Image Segmentation Evaluation},
  author={Cheng, Bowen and Girshick, Ross and Doll{\\'a}r, Piotr and Berg, Alexander C. and Kirillov, Alexander},
  booktitle={CVPR},
  year={2021}
}
@inproceedings{xie2024pasam,
  title={PA-SAM: Prompt Adapter SAM for High-Quality Image Segmentation},
  author={Xie, Zhaozhi and others},
  booktitle={ICME},
  year={2024}
}
"""

_DESCRIPTION = """\
Object mask quality as reported by HQ-SAM and PA-SAM on HQSeg-44K: for every object, the IoU of the predicted and
ground-truth masks and the IoU of their inner boundary bands (each mask minus its erosion by
max(1, round(0.02 x image diagonal)) pixels, the image border counting as background). Objects are averaged per
subset (dataset), and the reported means are the mean of the subset means, so that a large dataset does not outweigh
the others. Void pixels of the reference (`ignore_index`) count in neither mask.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`List[ndarray]`): one binary mask `(H, W)` per object (bool or 0/1), at the reference's size.
    references (`List[ndarray]`): the ground-truth masks `(H, W)`: 1 foreground, 0 background, `ignore_index` void.
        A reference with void pixels but no foreground is refused (a 0/255 mask would otherwise be all void and
        score 1 whatever the prediction): pass `(mask > 127)` for 0/255 masks.
    subsets (`List[str]`, *optional*): the subset (dataset) of each object; all objects form one subset when omitted.
    ignore_index (`int`, *optional*, defaults to 255): reference value of void pixels; `None` when there are none.
    dilation_ratio (`float`, *optional*, defaults to 0.02): boundary band width as a fraction of the image diagonal.
Returns:
    mean_iou (`float`): mean of the subset means of the mask IoU, in [0, 1].
    mean_boundary_iou (`float`): the same for the boundary IoU.
    num_objects (`int`): objects scored.
    per_subset (`dict`, only with `subsets`): `{subset: {"count", "mean_iou", "mean_boundary_iou"}}`.
Examples:
    >>> import numpy as np
    >>> from pasam_hf.metrics import load_evaluate_metric
    >>> metric = load_evaluate_metric()
    >>> gt = np.zeros((8, 8), dtype=np.uint8); gt[2:6, 2:6] = 1
    >>> pred = np.zeros((8, 8), dtype=np.uint8); pred[2:6, 2:4] = 1
    >>> metric.compute(predictions=[pred], references=[gt])["mean_iou"]
    0.5
"""

_MASK = datasets.Sequence(datasets.Sequence(datasets.Value("uint8")))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class PasamSegmentation(evaluate.Metric):
    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            module_type="metric",
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Masks of any size: a ragged (H, W) list per object (Array2D needs one fixed shape).
            features=datasets.Features({"predictions": _MASK, "references": _MASK}),
            reference_urls=["https://arxiv.org/abs/2103.16562", "https://arxiv.org/abs/2401.13051"],
        )

    def _compute(self, predictions, references, subsets=None, ignore_index=255, dilation_ratio=0.02):
        if subsets is not None and len(subsets) != len(predictions):
            raise ValueError(
                f"subsets names {len(subsets)} objects but there are {len(predictions)} predictions; give one subset "
                "name per object."
            )
        metrics = SegmentationMetrics()
        for index, (prediction, reference) in enumerate(zip(predictions, references)):
            prediction = np.asarray(prediction, dtype=np.uint8)
            reference = np.asarray(reference, dtype=np.uint8)
            ignore = None
            if ignore_index is not None:
                ignore = reference == ignore_index
                if ignore.any() and not (reference == 1).any():
                    # A 0/255 mask read as 0 background / 255 void: every object pixel would be ignored and any
                    # prediction would score 1.
                    raise ValueError(
                        f"references[{index}] holds no foreground (1) but {int(ignore.sum())} pixels of "
                        f"ignore_index={ignore_index} (void), so any prediction would score 1: a 0/255 mask? "
                        "References are 1 foreground, 0 background, ignore_index void: pass (mask > 127) for a "
                        "0/255 mask."
                    )
                reference = np.where(ignore, 0, reference)
            metrics.add_masks(
                f"object {index}",
                prediction,
                reference,
                ignore=ignore,
                subset="" if subsets is None else str(subsets[index]),
                instances=[index],
                dilation_ratio=dilation_ratio,
            )
        result = {**metrics.mean_of_means(), "num_objects": len(metrics)}
        if subsets is not None:
            result["per_subset"] = metrics.subset_means()
        return result
