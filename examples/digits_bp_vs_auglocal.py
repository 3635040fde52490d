"""Train paper:resnet32 on scikit-learn's digits with BP, AugLocal d=2 and d=4; print test accuracy.

    python examples/digits_bp_vs_auglocal.py            # all 1442 training / 355 test images, 3 epochs

Needs no files (the digits ship with scikit-learn; 8x8 images resized to 32x32 RGB).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fashion_mnist_bp_vs_auglocal import main  # noqa: E402

if __name__ == "__main__":
    main(dataset="digits", epochs=3, train_subset=None, test_subset=None, batch_size=64)
