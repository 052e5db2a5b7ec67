"""Half a minute of training on digits gives samples that a digits classifier reads as the asked-for digit."""

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from threadpoolctl import threadpool_limits

from difflab.data import load_dataset
from difflab.pipeline import Pipeline
from difflab.train import train
from tests.train.helpers import tiny_config


def test_thirty_seconds_of_digits_training_gives_recognisable_digits(tmp_path):
    # ~30 s on one busy core: unet-xs at 16 channels, 150 steps of batch 64 (9,600 images,
    # ~7 epochs of the 1,437 train digits). Measured accuracy over training seeds 0-2: 0.69-0.81.
    cfg = tiny_config(steps=150, batch_size=64, lr=3e-3, warmup=20, ema_decay=0.999, log_every=25)
    run = train(cfg, tmp_path / "digits", progress=False)

    train_set, test_set = load_dataset("digits", "train"), load_dataset("digits", "test")
    with threadpool_limits(1):  # BLAS threads on a busy 2-core machine make this fit 100x slower
        clf = LogisticRegression(max_iter=300, C=0.1).fit(train_set.images.flatten(1).numpy(), train_set.labels.numpy())
        assert clf.score(test_set.images.flatten(1).numpy(), test_set.labels.numpy()) > 0.95

        labels = torch.arange(100) % 10  # 10 of each digit, no guidance
        samples = Pipeline.from_pretrained(run)(100, class_labels=labels, steps=20, seed=0)
        assert samples.shape == (100, 1, 16, 16)
        predicted = clf.predict(samples.flatten(1).numpy())
    accuracy = float(np.mean(predicted == labels.numpy()))
    assert accuracy > 0.5, f"classifier accuracy on samples {accuracy:.2f} (chance 0.1)"
