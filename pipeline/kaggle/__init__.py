"""Kaggle integration: download and verify the data, submit a CSV, build/push/follow the
training kernel, and publish encoder weights for it — `python -m pipeline kaggle ...`.

    credentials  where the credentials are, and the `kaggle` CLI run as a subprocess
    dataset      download, unpack and verify the competition data (also run inside the kernel)
    submission   check a CSV, then submit it
    kernel       kernel-metadata.json and the self-contained kernel.py; push, status, output
    weights      a Kaggle dataset holding timm ImageNet weights, for kernels without internet
    commands     the argparse wiring (`pipeline/cli.py` delegates to it)

This package is named like the real `kaggle` library and must never shadow it: modules here
use absolute imports only and never `import kaggle` (importing it authenticates at import
time; Kaggle is reached through the CLI as a subprocess). The package is imported inside the
Kaggle kernel, so top levels use the standard library and `pipeline.errors` only.
"""

COMPETITION = "tgs-salt-identification-challenge"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
