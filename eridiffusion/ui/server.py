"""The HTTP side of `eri ui`: a Starlette app over the page modules, served by uvicorn.

Imported only through `eridiffusion.ui.create_app` / `serve`, which first check that the
`[ui]` extra is installed. Every handler is a method of `UI` taking the query (and the JSON
body of a POST) and returning JSON; `api()` maps the errors: a path outside the root 403,
missing 404, a run already going 409, any other user error 400 (field errors as
`{"errors": {"section.field": message}}`). `Guard` checks the token, the Host header
(a local server answers only to loopback names, against DNS rebinding) and that a POST is
same-origin JSON.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

import eridiffusion
from eridiffusion.config import ConfigError
from eridiffusion.data.buckets import BucketConfig
from eridiffusion.errors import UserError
from eridiffusion.io import write_text
from eridiffusion.runs import check as check_folder
from eridiffusion.ui import datasets, runs, schema
from eridiffusion.ui.jobs import Busy, SampleJob, TrainJob
from eridiffusion.ui.paths import PathRefused, Root

if TYPE_CHECKING:  # Starlette is the optional [ui] extra: imported where used
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

STATIC = Path(__file__).parent / "static"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
LIVE_PERIOD = 1.0  # seconds between server-sent events


class FieldErrors(UserError):
    def __init__(self, errors: dict[str, str]):
        super().__init__("; ".join(errors.values()))
        self.errors = errors


def _int(q: dict, name: str, default: int | None = None) -> int:
    value = q.get(name, default)
    if value is None:
        raise ValueError(f"missing {name}")
    return int(value)


class UI:
    """What the API does, over one root folder: one training child at a time, sample jobs."""

    def __init__(self, root: str | Path, demo: bool = False):
        self.root = Root(root)
        self.demo = demo
        self.job = TrainJob(self.root)
        self.samples: dict[int, SampleJob] = {}

    def health(self, q, body) -> dict:
        return {"ok": True, "root": str(self.root.path), "demo": self.demo, "version": eridiffusion.__version__}

    # -- dataset
    def folders(self, q, body) -> list:
        return datasets.image_folders(self.root)

    def dataset(self, q, body) -> dict:
        bucket = BucketConfig(_int(q, "resolution", 1024), _int(q, "bucket_step", 64), _int(q, "bucket_min", 512),
                              _int(q, "bucket_max", 2048))  # fmt: skip
        return datasets.scan(self.root, q["dir"], bucket)

    def caption(self, q, body) -> dict:
        return datasets.save_caption(self.root, body["path"], str(body["caption"]))

    def thumb(self, q, body) -> Response:
        from starlette.responses import Response

        path = self.root.resolve(q["path"], must_exist=True)
        data = datasets.thumbnail(path, min(_int(q, "size", 256), 1024))
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "no-cache"})

    def file(self, q, body) -> Response:
        from starlette.responses import FileResponse

        path = self.root.resolve(q["path"], must_exist=True)
        if not path.is_file():
            raise FileNotFoundError(f"{q['path']}: not a file")
        return FileResponse(path, filename=path.name if q.get("download") else None,
                            headers={"Cache-Control": "no-cache"})  # fmt: skip

    # -- train
    def schema(self, q, body) -> list:
        return schema.form_schema()

    def presets(self, q, body) -> list:
        return schema.presets(self.root.path)

    def validate(self, q, body) -> dict:
        cfg, errors = schema.check(body.get("config") or {}, self.root)
        return {"ok": not errors, "errors": errors, "toml": cfg.to_toml() if cfg else None}

    def train_start(self, q, body) -> dict:
        raw = body.get("config")
        if not isinstance(raw, dict):
            raise ValueError("the request needs a config object")
        cfg, errors = schema.check(raw, self.root)
        if errors:
            raise FieldErrors(errors)
        if body.get("overwrite"):
            cfg = cfg.replace(save={"overwrite": True})
        out = self.root.resolve(cfg.save.output_dir)
        errors = self._inputs_missing(cfg, raw)
        try:
            check_folder(out, overwrite=cfg.save.overwrite, resume=out / "state" if cfg.train.resume else None,
                         name=cfg.save.name)  # fmt: skip
        except ConfigError as e:
            errors["save.output_dir"] = str(e)
        if errors:
            raise FieldErrors(errors)
        if self.job.running:
            raise Busy(f"a run is going in {self.job.status()['dir']}: stop it first")
        config = write_text(out / runs.CONFIG_NAME, cfg.to_toml())
        return self.job.start(config, out, [])

    def _inputs_missing(self, cfg, raw: dict) -> dict[str, str]:
        """The trainer's `check_paths`, with the paths taken relative to the root."""
        paths = dict(schema.path_values(raw))
        errors = {}
        model = paths.get("model.path")
        if not model or not self.root.resolve(model).is_file():
            errors["model.path"] = f"model.path = {model!r}: no such file under {self.root.path}"
        data = paths.get("data.dir")
        if data and not self.root.resolve(data).is_dir():
            errors["data.dir"] = f"data.dir = {data!r}: no such folder under {self.root.path}"
        if not data and not cfg.data.subsets:
            errors["data.dir"] = "data.dir is empty: pick the image folder"
        return errors

    def train_stop(self, q, body) -> dict:
        return self.job.stop()

    def train_resume(self, q, body) -> dict:
        folder = self.root.resolve(body["dir"], must_exist=True)
        if runs.state_step(folder) is None:
            raise ValueError(f"{body['dir']}: no saved state to resume (state/state.json)")
        args = ["--resume", str(folder / "state")]
        if body.get("max_steps"):
            args.append(f"train.max_steps={int(body['max_steps'])}")
        config = folder / "config.toml" if (folder / "config.toml").is_file() else folder / runs.CONFIG_NAME
        return self.job.start(config, folder, args)

    def train_status(self, q, body) -> dict:
        return self.job.status()

    # -- runs
    def runs(self, q, body) -> list:
        return runs.list_runs(self.root)

    def run(self, q, body) -> dict:
        return runs.details(self.root, q["dir"])

    def live_poll(self, q, tail: runs.LiveTail | None) -> dict:
        job = self.job.status()
        return tail.poll(job) if tail is not None else {"job": job, "dir": None, "reset": True, "rows": []}

    # -- sample
    def weights(self, q, body) -> dict:
        found = {"models": [], "loras": []}
        for path in sorted(self.root.path.rglob("*.safetensors")):
            rel = self.root.relative(path)
            if any(p.startswith(".") or p in ("state", "cache") for p in Path(rel).parts[:-1]):
                continue
            try:
                kind = runs.weight_details(path)["kind"]
            except UserError:
                continue
            found["loras" if kind == "lora" else "models"].append(rel)
        return found

    def sample(self, q, body) -> dict:
        model = self.root.resolve(body["model"], must_exist=True)
        w, h = _int(body, "width", 1024), _int(body, "height", 1024)
        args = ["--model", str(model), "--prompt", str(body["prompt"]), "--negative", str(body.get("negative", "")),
                "--steps", str(_int(body, "steps", 30)), "--cfg", str(float(body.get("cfg", 7.0))),
                "--sampler", str(body.get("sampler", "euler")), "--seed", str(_int(body, "seed", 0)),
                "--size", f"{w}x{h}"]  # fmt: skip
        for lora in body.get("loras", []):
            args += ["--lora", f"{self.root.resolve(lora['path'], must_exist=True)}:{float(lora.get('scale', 1.0))}"]
        job = SampleJob(self.root, args, self.root.path / "samples")
        self.samples[job.id] = job
        return job.status()

    def sample_status(self, q, body) -> dict:
        job = self.samples.get(_int(q, "id"))
        if job is None:
            raise FileNotFoundError(f"no sample job {q['id']}")
        return job.status()


def _error(status: int, message: str, **extra) -> JSONResponse:
    from starlette.responses import JSONResponse

    return JSONResponse({"error": message, **extra}, status_code=status)


def api(method):
    """An endpoint calling `method(query, body)` in a worker thread, its errors mapped to statuses."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse, Response

    async def endpoint(request: Request) -> Response:
        body: Any = {}
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError:
                return _error(400, "the request body is not JSON")
            if not isinstance(body, dict):
                return _error(400, "the request body must be a JSON object")
        q = {**request.query_params, **request.path_params}
        try:
            out = await run_in_threadpool(method, q, body)
        except FieldErrors as e:
            return _error(400, str(e), errors=e.errors)
        except PathRefused as e:
            return _error(403, str(e))
        except FileNotFoundError as e:
            return _error(404, str(e))
        except Busy as e:
            return _error(409, str(e))
        except KeyError as e:
            return _error(400, f"missing {e.args[0]}")
        except (UserError, ValueError, TypeError, OSError) as e:  # OSError: e.g. a thumbnail of a non-image
            return _error(400, str(e))
        return out if isinstance(out, Response) else JSONResponse(out)

    return endpoint


class Guard:
    """ASGI middleware: token, Host header (local only), same-origin JSON for POSTs."""

    def __init__(self, app, token: str | None, local: bool):
        self.app, self.token, self.local = app, token, local

    def problem(self, request: Request) -> tuple[int, str] | None:
        if self.token is not None:
            given = request.headers.get("x-eri-token") or request.query_params.get("token") or ""
            auth = request.headers.get("authorization", "")
            given = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else given
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                return 401, "missing or wrong token: open the URL eri ui printed (…/?token=…)"
        elif self.local and request.url.hostname not in LOOPBACK:
            return 403, f"Host {request.url.hostname!r} refused: this server answers to 127.0.0.1 / localhost"
        if request.method not in ("GET", "HEAD"):
            origin = request.headers.get("origin")
            if origin and origin != f"{request.url.scheme}://{request.headers.get('host')}":
                return 403, f"cross-origin request from {origin} refused"
            if not request.headers.get("content-type", "").startswith("application/json"):
                return 415, "send JSON (Content-Type: application/json)"
        return None

    async def __call__(self, scope, receive, send):
        from starlette.requests import Request

        if scope["type"] == "http":
            found = self.problem(Request(scope))
            if found is not None:
                return await _error(*found)(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(root: str | Path, token: str | None = None, local: bool = True, demo: bool = False) -> Starlette:
    """The app serving `root`; with `token`, every request must carry it (header X-Eri-Token,
    `Authorization: Bearer`, or `?token=`)."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.responses import FileResponse, HTMLResponse, StreamingResponse
    from starlette.routing import Route

    ui = UI(root, demo=demo)
    qs = f"?token={token}" if token else ""

    async def index(request: Request) -> Response:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8").replace("{{qs}}", qs))

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = (STATIC / name).resolve()
        if path.parent != STATIC.resolve() or not path.is_file():
            return _error(404, f"{name}: not found")
        return FileResponse(path, headers={"Cache-Control": "no-cache"})

    async def live(request: Request) -> Response:
        q = dict(request.query_params)
        try:
            folder = ui.root.resolve(q["dir"], must_exist=True) if q.get("dir") else None
        except PathRefused as e:
            return _error(403, str(e))
        except (FileNotFoundError, ValueError) as e:
            return _error(404, str(e))

        async def events():
            tail, following = None, None
            while True:
                target = folder or ui.job.folder
                if target is not None and (target, ui.job.started) != following:  # a new run: start over
                    tail, following = runs.LiveTail(ui.root, target, 0.0 if folder else ui.job.since), (target, ui.job.started)
                data = await run_in_threadpool(ui.live_poll, q, tail)
                yield f"data: {json.dumps(data)}\n\n"
                if q.get("once") or await request.is_disconnected():
                    return
                await asyncio.sleep(LIVE_PERIOD)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    get = {"health": ui.health, "folders": ui.folders, "dataset": ui.dataset, "thumb": ui.thumb, "file": ui.file,
           "schema": ui.schema, "presets": ui.presets, "train/status": ui.train_status, "runs": ui.runs,
           "run": ui.run, "weights": ui.weights, "sample/{id}": ui.sample_status}  # fmt: skip
    post = {"caption": ui.caption, "validate": ui.validate, "train/start": ui.train_start,
            "train/stop": ui.train_stop, "train/resume": ui.train_resume, "sample": ui.sample}  # fmt: skip
    routes = [Route("/", index), Route("/static/{name}", static), Route("/api/live", live)]
    routes += [Route(f"/api/{path}", api(fn), methods=["GET"]) for path, fn in get.items()]
    routes += [Route(f"/api/{path}", api(fn), methods=["POST"]) for path, fn in post.items()]
    app = Starlette(routes=routes, middleware=[Middleware(Guard, token=token, local=local)])
    app.state.ui = ui
    return app


def serve(root: str | Path, host: str = "127.0.0.1", port: int = 7860, token: str | None = None,
          demo: bool = False) -> int:  # fmt: skip
    """`eri ui`: prepare the demo under `root` if asked, then serve until Ctrl-C (a run keeps going)."""
    import uvicorn

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if demo and not (root / "tiny_sdxl.safetensors").is_file():
        from eridiffusion.tiny import prepare

        prepare(root)
    local = host in LOOPBACK
    if not local and token is None:
        token = secrets.token_urlsafe(18)
        print(f"eri ui: bound to {host}, so every request needs this token (generated): {token}")
    app = create_app(root, token=token, local=local, demo=demo)
    shown = f"[{host}]" if ":" in host else host
    print(f"eri ui: serving {root.resolve()} at http://{shown}:{port}/{'?token=' + token if token else ''}", flush=True)
    # open event streams never end by themselves: give them a moment on Ctrl-C, then close them
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=2)
    return 0
