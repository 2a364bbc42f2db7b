r"""dhp-deploy: Differentiable Hebbian Plasticity for continual learning, trained, exported, served."""

from dhp_deploy.layer import DHPSoftmax, dhp_logits, hebbian_update
from dhp_deploy.network import DHPNet, task_logits

__version__ = "0.1.0"

__all__ = ["DHPSoftmax", "DHPNet", "dhp_logits", "hebbian_update", "task_logits", "__version__"]
