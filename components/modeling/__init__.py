"""Modeling: backbones, input pipelines and training. Imports `core`, `ingestion` and `quality`.

The backbone registry and unfreeze rule, augmentation transforms, input pipelines and the model folder,
frozen features and head training, the fine-tuning loop with checkpoints, the head-or-fine-tuned choice,
calibration, learning curves, the drift reference, and ONNX Runtime inference for frozen passes.
"""
