"""Write each hospital's own image folder from scikit-learn's digits (no download).

data/hospital-K/CLASS/N.png for K = 1..4, the digits dealt out in turn. Then:

    python examples/hospitals/make_images.py
    splitlearn run examples/hospitals/hospitals.toml --out runs/hospitals
"""

from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

here = Path(__file__).parent
d = load_digits()
for i, (img, y) in enumerate(zip(d.images, d.target)):
    folder = here / "data" / f"hospital-{i % 4 + 1}" / str(y)
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray((img * (255 / 16)).astype(np.uint8)).save(folder / f"{i}.png")
print(f"{len(d.target)} images in {here / 'data'}")
