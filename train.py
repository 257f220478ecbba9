"""Train, validate or test a federated model: ``python train.py fit --config conf/cifar.yaml``."""

from floral_lightning.cli import main

if __name__ == "__main__":
    main()
