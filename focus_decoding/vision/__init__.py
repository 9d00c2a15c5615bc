"""Image classifiers: `FocusClassifier`, the models and data it is measured on, and GradCAM before/after the step.

``classifier`` (FocusClassifier, the adapter) -> ``models`` (digits CNN, ccexam's CNNs, torchvision by
name) and ``data`` (digits, MNIST and its shifts, torchvision data sets from disk) -> ``gradcam``
(optional ``grad-cam`` package). torchvision, scikit-learn and grad-cam are imported on first use.
"""
from .classifier import METHODS, ClassifierStats, FocusClassifier, logits_of
from .data import DATASETS, REAL_DATASETS, digits_arrays, imagenet_transform, load_image_dataset, mnist_arrays, mnist_dataset, resize
from .shifts import SHIFTS, shift_images
from .models import (REAL_CLASSIFIERS, DigitsNet, MNISTNet, SVHNNet, USPSNet, default_digits_checkpoint, digits_model,
                     load_classifier, train_digits)

__all__ = ["METHODS", "ClassifierStats", "FocusClassifier", "logits_of", "DATASETS", "REAL_DATASETS", "SHIFTS",
           "digits_arrays", "imagenet_transform", "load_image_dataset", "mnist_arrays", "mnist_dataset", "resize",
           "shift_images", "REAL_CLASSIFIERS", "DigitsNet",
           "MNISTNet", "SVHNNet", "USPSNet", "default_digits_checkpoint", "digits_model", "load_classifier",
           "train_digits"]
