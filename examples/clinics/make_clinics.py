"""Write three clinics' own CSVs from scikit-learn's breast cancer data (no download).

Each clinic holds ten of the 30 measurements of its patients under string ids ("P0161"), its
rows in its own order; clinic_b never saw 25 of the patients and clinic_c 12 others. Then:

    python examples/clinics/make_clinics.py
    splitlearn run examples/clinics/clinics.toml --out runs/clinics
"""

import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_breast_cancer

here = Path(__file__).parent
d = load_breast_cancer()
ids = np.asarray([f"P{i:04d}" for i in range(len(d.target))])
rng = np.random.default_rng(0)
gone = {"clinic_a": [], "clinic_b": rng.choice(len(ids), 25, replace=False), "clinic_c": rng.choice(len(ids), 12, replace=False)}
for k, clinic in enumerate(("clinic_a", "clinic_b", "clinic_c")):
    rows = rng.permutation(np.setdiff1d(np.arange(len(ids)), gone[clinic]))
    cols = list(range(10 * k, 10 * k + 10))
    with open(here / f"{clinic}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", *(d.feature_names[c].replace(" ", "_") for c in cols)]
                   + (["diagnosis"] if clinic == "clinic_a" else []))
        for r in rows:
            w.writerow([ids[r], *(f"{d.data[r, c]:.6g}" for c in cols)]
                       + ([("malignant", "benign")[d.target[r]]] if clinic == "clinic_a" else []))
    print(f"{clinic}.csv: {len(rows)} patients")
