# Faster R-CNN R50-FPN 1x on COCO, fine-tuned with the backbone's BN frozen
# (norm_eval=True, as in mmdet) and every Conv+eval-BN pair in tune mode.
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py',
    '../_base_/fast_conv_bn_eval.py',
]
