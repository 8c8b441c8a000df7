"""`nmt serve`: the LibreTranslate HTTP API over a checkpoint or a CTranslate2 export, with dynamic
batching, and a web page showing a translation's cross-attention.

Requests (translations and attention maps) wait in one bounded queue; a single decoding thread takes
the first waiting request, waits ``batch_window_ms`` for others (up to ``max_batch`` requests and
``max_batch_tokens`` source tokens), and decodes all their sentences together. Requests whose client
has gone or whose deadline has passed are dropped before decoding; a batch that fails is decoded
again request by request, so one bad request fails alone. A full queue answers 503; a body, list,
text or token count over its limit 413; a missing or wrong ``api_key`` (when keys are configured)
403; a deadline passed 504; anything malformed 400, always as ``{"error": "..."}``. Uvicorn's
SIGTERM handling stops accepting connections and lets in-flight requests finish before the decoding
thread stops.
"""


import asyncio
import hmac
import json
import sys
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs

from nmt.errors import NMTError

# source tokens (EOS included) of an /attention text: its maps are at most 6 layers x 107 x 64
# weights (default max_len), ~200 KB of JSON
ATTENTION_MAX_TOKENS = 64
ATTENTION_DECIMALS = 2  # enough for a heat map's colour

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
    timeout: float = 60.0
    """Seconds a request may wait and decode before it is answered 504 (0: no limit)."""
    max_batch_tokens: int = 4096
    """Most source tokens decoded together; a request over it alone is answered 413."""
    api_keys: frozenset[str] | None = None
    """Keys a request must give as ``api_key`` (None: no check)."""


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

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Source tokens of each text, EOS included."""
        return [len(ids) + 1 for ids in self.tokenizer.encode_src(texts, threads=1)]

    def attention(self, text: str) -> dict:
        """The translation of ``text`` and its cross-attention, head mean per layer [T+1, S+1]."""
        from nmt.attention_maps import sentence_attention

        target = self.translate([text])[0]
        att = sentence_attention(self.model, self.tokenizer, text, target or None, self.cfg.decode)
        layers = [w.mean(0).tolist() for w in att.maps["cross"]]
        return {"translatedText": target, "source": att.source, "target": att.decoder_out,
                "layers": [[[round(x, ATTENTION_DECIMALS) for x in row] for row in layer] for layer in layers]}


class CT2Backend:
    """A CTranslate2 export (no attention maps)."""

    def __init__(self, path: str | Path, threads: int) -> None:
        from nmt.ct2_engine import CT2Translator

        self.translator = CT2Translator(path, threads=threads)
        self.src_lang, self.tgt_lang = self.translator.src_lang, self.translator.tgt_lang

    def translate(self, texts: list[str]) -> list[str]:
        return list(self.translator.translate(texts))

    def count_tokens(self, texts: list[str]) -> list[int]:
        return [len(ids) + 1 for ids in self.translator.sp.encode(texts)]

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


def _report_stop(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:  # /health says 503 from now on
        print(f"error: the batching task stopped: {task.exception()!r}", file=sys.stderr, flush=True)


@dataclass
class Job:
    """One waiting request: ``texts`` to decode with other requests', or ``work`` to run alone."""

    texts: list[str]
    future: asyncio.Future
    tokens: int = 0
    work: Callable[[], object] | None = None


class Batcher:
    """Collects requests and decodes them together on one worker thread.

    A request whose future is done (its client went away, or its deadline passed) is dropped
    before decoding: capacity goes to requests someone still waits for.
    """

    def __init__(self, translate, options: ServeOptions) -> None:
        self.translate = translate
        self.window = options.batch_window_ms / 1000.0
        self.max_batch = options.max_batch
        self.timeout = options.timeout or None
        self.max_tokens = options.max_batch_tokens
        self.held: Job | None = None  # taken from the queue, first of the next batch
        self.task: asyncio.Task | None = None
        self.queue: asyncio.Queue = asyncio.Queue(options.queue_size)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nmt-decode")
        self.batches = 0  # decoded batches, for /health
        self.sentences = 0
        self.pending = 0  # requests accepted and not yet answered

    def start(self) -> None:
        self.task = asyncio.create_task(self.run())
        self.task.add_done_callback(_report_stop)

    @property
    def alive(self) -> bool:
        return self.task is not None and not self.task.done()

    async def submit(self, texts: list[str], tokens: int = 0, gone: Awaitable | None = None) -> list[str]:
        """The translations of ``texts`` (``tokens`` long); ``gone`` completes when the client has left."""
        return await self._wait(Job(texts, asyncio.get_running_loop().create_future(), tokens), gone)

    async def submit_alone(self, work: Callable[[], object], gone: Awaitable | None = None):
        """``work()``'s result, run on the decoding thread in its own batch, queued like the others."""
        return await self._wait(Job([], asyncio.get_running_loop().create_future(), work=work), gone)

    async def _wait(self, job: Job, gone: Awaitable | None):
        watch = asyncio.ensure_future(gone) if gone is not None else None
        try:
            if not self.alive:
                raise RequestError(503, "the batching task has stopped; the server must be restarted")
            try:
                self.queue.put_nowait(job)
            except asyncio.QueueFull:
                raise RequestError(503, "the server is busy: too many requests waiting; retry later") from None
            self.pending += 1
            try:
                await asyncio.wait([f for f in (job.future, watch) if f is not None], timeout=self.timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                self.pending -= 1
                job.future.cancel()  # still waiting: the batcher drops it
            if not job.future.cancelled():
                return job.future.result()
            if watch is not None and watch.done():
                raise RequestError(499, "the client closed the connection")  # answered to no one
            raise RequestError(504, f"no answer within {self.timeout:g} s (--timeout)")
        finally:
            if watch is not None:
                watch.cancel()

    async def run_exclusive(self, fn, *args):
        """Run ``fn`` on the decoding thread (one model user at a time)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    async def _next(self, timeout: float | None = None) -> Job | None:
        """The next waiting job someone still waits for; None after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            if self.queue.empty() and deadline is not None:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return None
                try:
                    job = await asyncio.wait_for(self.queue.get(), remaining)
                except asyncio.TimeoutError:
                    return None
            else:
                job = self.queue.get_nowait() if not self.queue.empty() else await self.queue.get()
            if not job.future.done():
                return job

    async def _collect(self) -> list[Job]:
        held, self.held = self.held, None
        batch = [held if held is not None and not held.future.done() else await self._next()]
        if batch[0].work is not None:
            return batch
        tokens = batch[0].tokens
        deadline = asyncio.get_running_loop().time() + self.window
        while len(batch) < self.max_batch:
            job = await self._next(max(0.0, deadline - asyncio.get_running_loop().time()))
            if job is None:
                break
            if job.work is not None or tokens + job.tokens > self.max_tokens:
                self.held = job  # a batch bounded in tokens too: one long request cannot hold others
                break
            batch.append(job)
            tokens += job.tokens
        return batch

    async def run(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._decode(batch)
            except Exception:  # noqa: BLE001 - find the request at fault: each alone
                for job in batch:
                    await self._decode([job])

    async def _decode(self, batch: list[Job]) -> None:
        """Decode the batch's texts together; a failure of a single request is its own answer."""
        batch = [job for job in batch if not job.future.done()]  # nobody waits for the others
        if not batch:
            return
        alone = batch[0].work
        texts = [t for job in batch for t in job.texts]
        try:
            outputs = await (self.run_exclusive(alone) if alone else self.run_exclusive(self.translate, texts))
        except Exception as e:
            if len(batch) > 1:
                raise
            if not batch[0].future.done():
                batch[0].future.set_exception(e)
            return
        self.batches += 1
        if alone:
            if not batch[0].future.done():
                batch[0].future.set_result(outputs)
            return
        self.sentences += len(texts)
        start = 0
        for job in batch:
            if not job.future.done():  # it may have gone while decoding
                job.future.set_result(outputs[start:start + len(job.texts)])
            start += len(job.texts)


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
        except RecursionError:
            raise RequestError(400, "invalid JSON: nested too deeply") from None
        if not isinstance(params, dict):
            raise RequestError(400, "the JSON body must be an object")
        return params
    form = parse_qs(text, keep_blank_values=True)
    return {k: v[0] if len(v) == 1 else v for k, v in form.items()}


def check_api_key(params: dict, options: ServeOptions) -> None:
    """LibreTranslate's check: with keys configured, ``api_key`` must be one of them (else 403)."""
    if options.api_keys is None:
        return
    key = params.get("api_key")
    given = key.encode("utf-8", "surrogatepass") if isinstance(key, str) else b""
    # compare_digest against every key: the time taken says nothing about which key is close
    if not sum(hmac.compare_digest(given, k.encode("utf-8")) for k in options.api_keys):
        raise RequestError(403, "Invalid API key")


def load_api_keys(path: str | Path) -> frozenset[str]:
    """One key a line; blank lines and lines starting with # are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise NMTError(f"cannot read --api-keys {path}: {e}") from None
    keys = frozenset(k.strip() for k in lines if k.strip() and not k.strip().startswith("#"))
    if not keys:
        raise NMTError(f"--api-keys {path} holds no key (one a line)")
    return keys


def exposure_warning(host: str, options: ServeOptions) -> str | None:
    """A warning when anyone on the network may use the server: a non-loopback address, no keys."""
    import ipaddress

    if options.api_keys is not None or host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:  # a host name
        pass
    return (f"warning: serving on {host} without --api-keys: anyone who can reach this address can "
            f"use the server")


def check_tokens(tokens: int, options: ServeOptions) -> None:
    if tokens > options.max_batch_tokens:
        raise RequestError(413, f"q is {tokens} tokens; at most {options.max_batch_tokens} per request "
                                f"(--max-batch-tokens)")


def check_translate(params: dict, backend, options: ServeOptions) -> tuple[list[str], bool]:
    """(texts, whether q was a list) after checking the language pair, format and limits."""
    q = params.get("q")
    if q is None:
        raise RequestError(400, "missing parameter q (the text, or a list of texts)")
    single = isinstance(q, str)
    texts = [q] if single else q
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise RequestError(400, "q must be a string or a list of strings")
    for t in texts:
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:  # JSON's "\ud800": a lone surrogate, no character at all
            raise RequestError(400, "q holds text that is not valid Unicode (a lone surrogate)") from None
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


async def _disconnected(request) -> None:
    """Completes when the client has closed the connection (its body has been read by now)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)


def create_app(backend, options: ServeOptions):
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse
    from starlette.exceptions import HTTPException

    state: dict = {}

    @asynccontextmanager
    async def lifespan(app):
        batcher = Batcher(backend.translate, options)
        batcher.start()
        state["batcher"] = app.state.batcher = batcher
        yield
        # uvicorn has let in-flight requests finish by now
        batcher.task.cancel()
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
        params = await read_params(request, options)
        check_api_key(params, options)
        texts, single = check_translate(params, backend, options)
        tokens = sum(backend.count_tokens(texts))
        check_tokens(tokens, options)
        outputs = await state["batcher"].submit(texts, tokens, _disconnected(request))
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
        if not batcher.alive:
            return JSONResponse({"status": "error", "error": "the batching task has stopped"}, status_code=503)
        return {"status": "ok", "waiting": batcher.queue.qsize(), "pending": batcher.pending,
                "batches": batcher.batches, "sentences": batcher.sentences}

    @app.post("/attention")
    async def attention(request: Request):
        params = await read_params(request, options)
        check_api_key(params, options)
        texts, single = check_translate({"source": backend.src_lang, "target": backend.tgt_lang, **params},
                                        backend, options)
        if not single or not texts[0].strip():
            raise RequestError(400, "attention needs q: one non-empty text")
        tokens = backend.count_tokens(texts)[0]
        if tokens > ATTENTION_MAX_TOKENS:
            raise RequestError(413, f"attention maps are for texts up to {ATTENTION_MAX_TOKENS} tokens; "
                                    f"this one is {tokens}")
        return await state["batcher"].submit_alone(partial(backend.attention, texts[0]), _disconnected(request))

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
    sizes = {"--max-batch": options.max_batch, "--queue-size": options.queue_size,
             "--max-batch-tokens": options.max_batch_tokens, "--max-chars": options.max_chars,
             "--max-texts": options.max_texts, "--max-body-bytes": options.max_body_bytes}
    for flag, value in sizes.items():
        if value < 1:
            raise NMTError(f"{flag} must be >= 1, got {value}")
    if options.batch_window_ms < 0 or options.timeout < 0:
        raise NMTError("--batch-window-ms and --timeout must be >= 0")
    backend = load_backend(model, options.threads)
    app = create_app(backend, options)
    config = uvicorn.Config(app, host=options.host, port=options.port, log_level="warning",
                            timeout_graceful_shutdown=60, access_log=False)
    print(f"serving {backend.src_lang} -> {backend.tgt_lang} on http://{options.host}:{options.port}/",
          flush=True)
    warning = exposure_warning(options.host, options)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    uvicorn.Server(config).run()
