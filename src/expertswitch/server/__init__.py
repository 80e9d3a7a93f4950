"""OpenAI-compatible HTTP server over the engine (`expertswitch serve`); needs the `serve` extra
(`pip install -e ".[serve]"`: fastapi, uvicorn, prometheus-client).

    from expertswitch.server import build_app, run_server
"""

from expertswitch.server.launch import ServerThread, build_app, run_server
from expertswitch.server.serving import ServerConfig

__all__ = ["ServerConfig", "ServerThread", "build_app", "run_server"]
