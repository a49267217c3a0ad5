"""An image classifier for scikit-learn's bundled handwritten digits (1,797 8x8 images).

Each image is 64 pixel intensities (0-16). The network is the project's default: two hidden
ReLU layers of 256 and 128 units and a softmax output over the 10 digits, trained with Adam on
minibatches in this process.

    python docs/examples/digits.py
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import confusion_matrix
from sklearn.model_selection import train_test_split

from pipeline import MLPClassifier


def main() -> None:
    X, y = load_digits(return_X_y=True)  # X: (1797, 64), one row per flattened 8x8 image
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)

    clf = MLPClassifier(
        hidden_layer_sizes=(256, 128), activation="relu", batch_size=32, max_iter=30, n_iter_no_change=0, random_state=0
    )
    clf.fit(X_tr, y_tr)
    pred = clf.predict(X_te)
    print(f"digits: {len(X_tr)} training images, {len(X_te)} test images")
    print(f"test accuracy {np.mean(pred == y_te):.3f} after {clf.n_iter_} epochs")
    print("confusion matrix (rows: true digit 0-9, columns: predicted):")
    print(confusion_matrix(y_te, pred))
    first = X_te[0].reshape(8, 8)
    print(f"the first test image (true {y_te[0]}, predicted {pred[0]}):")
    for row in first:
        print("  " + "".join(" .:-=+*#%@"[int(v) * 9 // 16] for v in row))


if __name__ == "__main__":
    main()
