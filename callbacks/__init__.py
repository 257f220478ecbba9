"""Lightning callbacks of floral-lightning: the federated round loop, mixture checkpoints and the run report."""

from .federated import FederatedCallback, sample_clients
from .mixture_checkpoint import MixtureCheckpoint, mixtures_path
from .progress import FederatedProgressBar
from .run_report import RunReport

__all__ = [
    "FederatedCallback",
    "FederatedProgressBar",
    "MixtureCheckpoint",
    "RunReport",
    "mixtures_path",
    "sample_clients",
]
