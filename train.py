"""Train, validate, test or predict with a YAML recipe from configs/.

    python train.py fit --config configs/quickstart.yaml
    python train.py test --config configs/quickstart.yaml --ckpt_path runs/quickstart/version_0/checkpoints/last.ckpt
    python train.py fit --config configs/cifar10_cpu.yaml --trainer.max_time 00:00:30:00

Every option can be overridden on the command line; ``--help`` lists them and
``--print_config`` writes a starting YAML.
"""

import sys

from vit.cli import run

if __name__ == "__main__":
    sys.exit(run())
