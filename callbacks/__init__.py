"""Lightning callbacks of floral-lightning: the federated round loop and mixture checkpoints."""

from .federated import FederatedCallback, sample_clients
from .mixture_checkpoint import MixtureCheckpoint, mixtures_path

__all__ = ["FederatedCallback", "MixtureCheckpoint", "mixtures_path", "sample_clients"]
