"""Expert parallelism: placement of routed experts over ranks, the all-to-all dispatcher, and the one
function that applies EP to a model (`dsray.parallel.ep.apply_ep`).

Pure torch + torch.distributed; process groups come in as arguments (no globals, no ray).
"""

from dsray.parallel.dispatch import AllToAllDispatcher, DispatchMeta
from dsray.parallel.placement import Placement, RouteTable

__all__ = ["AllToAllDispatcher", "DispatchMeta", "Placement", "RouteTable"]
