"""`nmt serve`: the LibreTranslate HTTP API over a checkpoint or a CTranslate2 export, with dynamic
batching, and a web page showing a translation's cross-attention.

Requests wait in one bounded queue; a single decoding thread takes the first waiting request, waits
``batch_window_ms`` for others (up to ``max_batch``), and decodes all their sentences together. A
full queue answers 503; a body, list or text over its limit 413; anything malformed 400, always as
``{"error": "..."}``. Uvicorn's SIGTERM handling stops accepting connections and lets in-flight
requests finish before the decoding thread stops.
"""


import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

from nmt.errors import NMTError

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech", "es": "Spanish",
                  "it": "Italian", "nl": "Dutch", "ro": "Romanian", "ru": "Russian", "zh": "Chinese"}


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 5000
    batch_window_ms: float = 5.0
    """How long the first request of a batch waits for more."""
    max_batch: int = 64
    """Most requests decoded together (1: one request at a time)."""
    queue_size: int = 256
    """Requests allowed to wait; more are answered 503."""
    threads: int = 0
    """CPU threads for decoding (0: the library default)."""
    max_body_bytes: int = 64 * 1024
    max_texts: int = 128
    """Most sentences in one request's ``q`` list."""
    max_chars: int = 2000
    """Longest single text."""


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- models --------------------------------------------------------------------------------------


class TorchBackend:
    """A checkpoint decoded by our own search (its decode settings), with attention maps."""

    def __init__(self, path: str | Path, threads: int) -> None:
        import torch

        from nmt.checkpoint import load_for_inference

        if threads > 0:
            torch.set_num_threads(threads)
        from nmt.precision import decode_precision

        self.model, self.tokenizer, self.cfg = load_for_inference(path)
        self.precision = decode_precision("auto", next(self.model.parameters()).device)
        self.src_lang, self.tgt_lang = self.cfg.data.src_lang, self.cfg.data.tgt_lang

    def translate(self, texts: list[str]) -> list[str]:
        from nmt.translate import translate_lines

        device = next(self.model.parameters()).device
        return list(translate_lines(self.model, self.tokenizer, texts, self.cfg.decode, device, self.precision,
                                    search="beam"))

    def attention(self, text: str) -> dict:
        """The translation of ``text`` and its cross-attention, head mean per layer [T+1, S+1]."""
        from nmt.attention_plot import sentence_attention

        target = self.translate([text])[0]
        att = sentence_attention(self.model, self.tokenizer, text, target or None, self.cfg.decode)
        layers = [w.mean(0).tolist() for w in att.maps["cross"]]
        return {"translatedText": target, "source": att.source, "target": att.decoder_out,
                "layers": [[[round(x, 4) for x in row] for row in layer] for layer in layers]}


class CT2Backend:
    """A CTranslate2 export (no attention maps)."""

    def __init__(self, path: str | Path, threads: int) -> None:
        from nmt.ct2_engine import CT2Translator

        self.translator = CT2Translator(path, threads=threads)
        self.src_lang, self.tgt_lang = self.translator.src_lang, self.translator.tgt_lang

    def translate(self, texts: list[str]) -> list[str]:
        return list(self.translator.translate(texts))

    def attention(self, text: str) -> dict:
        raise RequestError(400, "attention maps need a checkpoint (.pt), not a CTranslate2 export")


def load_backend(path: str | Path, threads: int = 0):
    from nmt.ct2_engine import is_ct2_dir

    path = Path(path)
    if path.is_dir():
        if not is_ct2_dir(path):
            raise NMTError(f"{path} is not a CTranslate2 export (no model.bin); give a .pt checkpoint "
                           f"or an `nmt export --to ctranslate2` folder")
        return CT2Backend(path, threads)
    return TorchBackend(path, threads)


# -- dynamic batching ----------------------------------------------------------------------------


class Batcher:
    """Collects requests and decodes them together on one worker thread."""

    def __init__(self, translate, options: ServeOptions) -> None:
        self.translate = translate
        self.window = options.batch_window_ms / 1000.0
        self.max_batch = options.max_batch
        self.queue: asyncio.Queue = asyncio.Queue(options.queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmt-decode")
        self.batches = 0  # decoded batches, for /health
        self.sentences = 0
        self.pending = 0  # requests accepted and not yet answered

    async def submit(self, texts: list[str]) -> list[str]:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((texts, future))
        except asyncio.QueueFull:
            raise RequestError(503, "the server is busy: too many requests waiting; retry later") from None
        self.pending += 1
        try:
            return await future
        finally:
            self.pending -= 1

    async def run_exclusive(self, fn, *args):
        """Run ``fn`` on the decoding thread (one model user at a time)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _collect(self) -> list:
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.window
        while len(batch) < self.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except asyncio.TimeoutError:
                break
        return batch

    async def run(self) -> None:
        while True:
            batch = await self._collect()
            texts = [t for texts, _ in batch for t in texts]
            try:
                outputs = await self.run_exclusive(self.translate, texts)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            self.batches += 1
            self.sentences += len(texts)
            start = 0
            for texts_i, future in batch:
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result(outputs[start:start + len(texts_i)])
                start += len(texts_i)


# -- HTTP ----------------------------------------------------------------------------------------


async def read_params(request, options: ServeOptions) -> dict:
    """The request's parameters from a JSON or form body (LibreTranslate accepts both)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > options.max_body_bytes:
        raise RequestError(413, f"request body over {options.max_body_bytes} bytes")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > options.max_body_bytes:
            raise RequestError(413, f"request body over {options.max_body_bytes} bytes")
    if not body.strip():
        raise RequestError(400, "empty request body; send JSON like {\"q\": \"text\", \"source\": ..., \"target\": ...}")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "request body is not UTF-8") from None
    if "json" in request.headers.get("content-type", "") or text.lstrip()[:1] in "{[":
        try:
            params = json.loads(text)
        except json.JSONDecodeError as e:
            raise RequestError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
        if not isinstance(params, dict):
            raise RequestError(400, "the JSON body must be an object")
        return params
    form = parse_qs(text, keep_blank_values=True)
    return {k: v[0] if len(v) == 1 else v for k, v in form.items()}


def check_translate(params: dict, backend, options: ServeOptions) -> tuple[list[str], bool]:
    """(texts, whether q was a list) after checking the language pair, format and limits."""
    q = params.get("q")
    if q is None:
        raise RequestError(400, "missing parameter q (the text, or a list of texts)")
    single = isinstance(q, str)
    texts = [q] if single else q
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "q must be a string or a list of strings")
    source, target = params.get("source"), params.get("target")
    if source not in (backend.src_lang, "auto") or target != backend.tgt_lang:
        raise RequestError(400, f"unsupported language pair {source!r} -> {target!r}; this server "
                                f"translates {backend.src_lang} -> {backend.tgt_lang}")
    if params.get("format", "text") != "text":
        raise RequestError(400, f"unsupported format {params.get('format')!r}; only 'text'")
    if len(texts) > options.max_texts:
        raise RequestError(413, f"{len(texts)} texts in q; at most {options.max_texts} per request")
    if any(len(t) > options.max_chars for t in texts):
        raise RequestError(413, f"a text in q is over {options.max_chars} characters")
    return texts, single


def create_app(backend, options: ServeOptions):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(backend.translate, options)
        worker = asyncio.create_task(batcher.run())
        state["batcher"] = batcher
        yield
        # uvicorn has let in-flight requests finish by now
        worker.cancel()
        batcher.executor.shutdown(wait=True)

    app = FastAPI(title="nmt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(RequestError)
    async def request_error(request, e: RequestError):
        return JSONResponse({"error": str(e)}, status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return JSONResponse({"error": str(e.detail)}, status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):
        message = str(e) if isinstance(e, NMTError) else "internal error"
        return JSONResponse({"error": message}, status_code=500)

    @app.post("/translate")
    async def translate(request: Request):
        texts, single = check_translate(await read_params(request, options), backend, options)
        outputs = await state["batcher"].submit(texts)
        return {"translatedText": outputs[0] if single else outputs}

    @app.get("/languages")
    async def languages():
        return [{"code": backend.src_lang, "name": LANGUAGE_NAMES.get(backend.src_lang, backend.src_lang),
                 "targets": [backend.tgt_lang]},
                {"code": backend.tgt_lang, "name": LANGUAGE_NAMES.get(backend.tgt_lang, backend.tgt_lang),
                 "targets": []}]

    @app.get("/health")
    async def health():
        batcher = state["batcher"]
        return {"status": "ok", "waiting": batcher.queue.qsize(), "pending": batcher.pending,
                "batches": batcher.batches, "sentences": batcher.sentences}

    @app.post("/attention")
    async def attention(request: Request):
        params = await read_params(request, options)
        texts, single = check_translate({"source": backend.src_lang, "target": backend.tgt_lang, **params},
                                        backend, options)
        if not single or not texts[0].strip():
            raise RequestError(400, "attention needs q: one non-empty text")
        return await state["batcher"].run_exclusive(backend.attention, texts[0])

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("nmt").joinpath("static/index.html").read_text(encoding="utf-8")

    return app


def serve(model: str | Path, options: ServeOptions) -> None:
    """Load the model, then serve until SIGTERM / Ctrl-C."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise NMTError("serving needs FastAPI and uvicorn; pip install 'nmt[serve]'") from None
    if options.max_batch < 1 or options.queue_size < 1 or options.batch_window_ms < 0:
        raise NMTError("--max-batch and --queue-size must be >= 1 and --batch-window-ms >= 0")
    backend = load_backend(model, options.threads)
    app = create_app(backend, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=60, access_log=False)
    print(f"serving {backend.src_lang} -> {backend.tgt_lang} on http://{options.host}:{options.port}/",
          flush=True)
    uvicorn.Server(config).run()
