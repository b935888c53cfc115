"""Routing: many SkillPacks on one base, one chosen per query.

``classifier`` holds the routers (GraftRouter, ManualRouter) and the query embedders; ``config`` the router folder's
validated configuration (RouterConfig, PackSource); ``storage`` saves, pushes and pulls router folders; and
``routed_model`` routes and runs (RoutedGraftModel).
"""

from .classifier import BaseModelEmbedder, GraftRouter, ManualRouter, QueryEmbedder
from .config import PackSource, RouterConfig
from .routed_model import RoutedGraftModel
from .storage import pull_router, push_router_folder

__all__ = [
    "BaseModelEmbedder",
    "GraftRouter",
    "ManualRouter",
    "PackSource",
    "QueryEmbedder",
    "RoutedGraftModel",
    "RouterConfig",
    "pull_router",
    "push_router_folder",
]
