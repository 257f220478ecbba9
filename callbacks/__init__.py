"""Lightning callbacks of floral-lightning: the federated round loop, mixture checkpoints, the run report, and the
router's opt-in initialisations and diagnostics."""

from .federated import FederatedCallback, sample_clients
from .mixture_checkpoint import MixtureCheckpoint, mixtures_path
from .progress import FederatedProgressBar
from .router_diagnostics import RouterDiagnostics
from .router_init import AdaptorInitNoise, ClusteredRouterInit
from .run_report import RunReport

__all__ = [
    "AdaptorInitNoise",
    "ClusteredRouterInit",
    "FederatedCallback",
    "FederatedProgressBar",
    "MixtureCheckpoint",
    "RouterDiagnostics",
    "RunReport",
    "mixtures_path",
    "sample_clients",
]
