"""A simulated GPU cluster on the real control plane: no weights, no tensors, simulated time.

The engine's router, schedulers, RManagers, GManager and rebalancer run unchanged; only the data
plane is replaced by `SimExecutor`, whose step times come from a cost model (cost.py) of the
model's shapes (models.py) on a device profile (devices.py). See docs/simulation.md.
"""

from infinillm.sim.cost import CostModel, StepCost
from infinillm.sim.devices import DeviceProfile, load_profile, profile_names
from infinillm.sim.executor import SimExecutor
from infinillm.sim.models import PRESETS as MODEL_PRESETS
from infinillm.sim.models import sim_model_folder

__all__ = ["MODEL_PRESETS", "CostModel", "DeviceProfile", "SimExecutor", "StepCost",
           "load_profile", "profile_names", "sim_model_folder"]
