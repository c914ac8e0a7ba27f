"""Look inside gpt-oss: tracing (trace.py), interventions (interventions.py), steering vectors
(steering.py), the logit lens (lens.py), router statistics (router.py), and the commands behind
`ossgpt inspect` (commands.py) with their plots and pages (report.py)."""

from .interventions import ablate_experts, force_experts, patch, scale_sinks, steer
from .steering import SteeringVector, difference_of_means, steering
from .trace import InspectError, Trace, run

__all__ = ["InspectError", "SteeringVector", "Trace", "ablate_experts", "difference_of_means",
           "force_experts", "patch", "run", "scale_sinks", "steer", "steering"]
