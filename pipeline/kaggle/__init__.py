"""Kaggle integration: download and verify the data, submit a CSV, build/push/follow the
training kernel, and publish encoder weights for it — `python -m pipeline kaggle ...`.

    credentials  where the credentials are, and the `kaggle` CLI run as a subprocess
    dataset      download, unpack and verify the competition data (also run inside the kernel)
    submission   check a CSV, then submit it
    kernel       kernel-metadata.json and the self-contained kernel.py; push, status, output
    mounts       where the kernel finds the competition and a weights dataset under /kaggle/input
    weights      a Kaggle dataset holding timm ImageNet weights, for kernels without internet
    commands     the argparse wiring (`pipeline/cli.py` delegates to it)

This package is named like the real `kaggle` library and must never shadow it: modules here
use absolute imports only and never `import kaggle` (importing it authenticates at import
time; Kaggle is reached through the CLI as a subprocess). The package is imported inside the
Kaggle kernel, so top levels use the standard library and `pipeline.errors` only.
"""

COMPETITION = "tgs-salt-identification-challenge"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
# The GPUs a kernel can ask for (kernel-metadata.json's machine_shape) that this pipeline runs on.
# Kaggle still hands out P100s, whose sm_60 its torch build has no kernels for: CUDA is
# "available", then the first kernel launch fails. pipeline/runtime.py says the same of any GPU
# the running torch was not built for.
PICK_A_GPU = "pick Kaggle's T4 x2 or L4 instead (kernel build --gpu NvidiaTeslaT4 or --gpu NvidiaL4)"
P100_REFUSED = ("Kaggle's torch build has no kernels for the P100 (compute capability 6.0, sm_60): training "
                f"would stop at its first GPU operation ('no kernel image is available'); {PICK_A_GPU}")
