"""A tiny real Keras classifier for the evaluate/predict tests (no training stage needed)."""

from __future__ import annotations

import keras


def tiny_convnet(image_size: int, n_classes: int) -> keras.Model:
    """Rescaling → one 3×3 conv → global pooling → softmax: takes raw pixels like our models."""
    return keras.Sequential(
        [
            keras.Input((image_size, image_size, 3)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(n_classes, activation="softmax"),
        ]
    )
