"""Ray runtime: Engine, Router, DriverRank and ExpertShard actors. The only package that imports ray."""

from dsray.runtime.engine import Engine, Resources, attach_router

__all__ = ["Engine", "Resources", "attach_router"]
