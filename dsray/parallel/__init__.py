"""Expert parallelism: placement of routed experts over ranks and the token dispatchers.

Pure torch + torch.distributed; process groups come in as arguments (no globals, no ray).
"""

from dsray.parallel.dispatch import AllToAllDispatcher, DispatchMeta, LocalDispatcher
from dsray.parallel.placement import Placement, RouteTable

__all__ = ["AllToAllDispatcher", "DispatchMeta", "LocalDispatcher", "Placement", "RouteTable"]
