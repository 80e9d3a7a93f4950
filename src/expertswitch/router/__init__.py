"""Model-level routing (ME-Switch): which expert should answer this query? Domain
classification over a text embedding."""

from expertswitch.router.router import Route, Router, load_router

__all__ = ["Route", "Router", "load_router"]
