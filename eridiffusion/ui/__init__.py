"""`eri ui`: a local web app to prepare a dataset, train, watch a run and sample.

The server (`server.py`, Starlette + uvicorn, the optional extra `eridiffusion[ui]`) serves a
single page (`static/`, plain HTML/JS/CSS, no build step) and a JSON API. The modules beside
it hold what the API does, free of any web library: `paths` (every path stays under the root),
`schema` (the Train form from the config dataclasses), `datasets` (the trainer's scan, captions),
`runs` (run folders, live metrics) and `jobs` (training and sampling as child processes).
"""

from __future__ import annotations

from eridiffusion.errors import UserError

INSTALL = "pip install 'eridiffusion[ui]'"


def require() -> None:
    """Raise a one-line UserError when the server's libraries are not installed."""
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise UserError(f"the web UI needs {e.name}, which is not installed: {INSTALL}") from None


def create_app(root, token: str | None = None, local: bool = True, demo: bool = False):
    """The Starlette app serving `root` (see `server.create_app`)."""
    require()
    from eridiffusion.ui import server

    return server.create_app(root, token=token, local=local, demo=demo)


def serve(root, host: str = "127.0.0.1", port: int = 7860, token: str | None = None, demo: bool = False) -> int:
    """Run the server until interrupted (see `server.serve`)."""
    require()
    from eridiffusion.ui import server

    return server.serve(root, host=host, port=port, token=token, demo=demo)
