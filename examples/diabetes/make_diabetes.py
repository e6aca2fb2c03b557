"""Write the diabetes study's three files from scikit-learn's diabetes data (no download).

Two clinics measure the same 442 patients in different ways (clinic_a: age, sex, BMI, blood
pressure; clinic_b: six blood serum measurements), under string ids ("D0161"), each in its own
order; a registry holds the outcome, disease progression one year later (a number from 25 to 346).
clinic_a never saw 12 of the patients, clinic_b 9 others, and the registry has no outcome for 7.
Then:

    python examples/diabetes/make_diabetes.py
    splitlearn run examples/diabetes/diabetes.toml --out runs/diabetes
"""

import csv
from pathlib import Path

import numpy as np
from sklearn.datasets import load_diabetes

here = Path(__file__).parent
d = load_diabetes()
ids = np.asarray([f"D{i:04d}" for i in range(len(d.target))])
rng = np.random.default_rng(0)
names = list(d.feature_names)
files = {"clinic_a": names[:4], "clinic_b": names[4:], "registry": []}
gone = {"clinic_a": rng.choice(len(ids), 12, replace=False), "clinic_b": rng.choice(len(ids), 9, replace=False),
        "registry": rng.choice(len(ids), 7, replace=False)}
for party, columns in files.items():
    rows = rng.permutation(np.setdiff1d(np.arange(len(ids)), gone[party]))
    cols = [names.index(c) for c in columns]
    with open(here / f"{party}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["patient", *columns] + (["progression"] if party == "registry" else []))
        for r in rows:
            w.writerow([ids[r], *(f"{d.data[r, c]:.6g}" for c in cols)]
                       + ([f"{d.target[r]:.1f}"] if party == "registry" else []))
    print(f"{party}.csv: {len(rows)} patients")
