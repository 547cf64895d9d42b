"""What `scc serve` changes in Ray Serve's proxy (imports nothing heavy: it runs in every Ray worker of the service).

    env = proxy_env(header_timeout_s=10, body_timeout_s=10, max_message_bytes=16 << 20, grpc_cert=..., grpc_key=...)
    check_targets()                             # in `scc serve`, before Ray starts: [] or what is missing
    os.environ.update(env); ray.init(..., runtime_env={"env_vars": env, "worker_process_setup_hook": HOOK})

Ray Serve runs uvicorn (HTTP) and a grpc.aio server (gRPC) in its proxy actor and exposes few of their settings. The
worker setup hook, run in each worker before Serve starts anything there, sets what it does not expose:
- HTTP read deadlines per connection: the request line and headers must arrive within SCC_HEADER_TIMEOUT_S of the
  connection's start (or of the previous answer on a kept-alive connection), and the body within SCC_BODY_TIMEOUT_S
  of the headers; otherwise the connection gets a 408 (when nothing of an answer was sent yet) and is closed. uvicorn
  alone never times out a client that sends its headers slowly.
- TLS (HTTP): TLS 1.2 or newer, TLS 1.2 suites limited to ECDHE key exchange with AEAD ciphers (TLS_CIPHERS; TLS 1.3
  suites are all AEAD), no compression, no renegotiation.
- gRPC: TLS with the HTTP certificate when SCC_GRPC_TLS_CERT/KEY are set (Ray Serve's gRPC proxy has no TLS option),
  on the address scc.serve.loopback chooses; the largest message is RAY_SERVE_GRPC_MAX_MESSAGE_SIZE (Ray reads it).
These patch Ray and uvicorn internals, and every patch fails closed:
- uvicorn's `Config` class is patched in place (its `__init__` and `load`), so every name Ray reaches it by
  (`uvicorn.Config`, `uvicorn.config.Config`, a bare imported `Config`) builds a hardened server; `load` refuses a
  server whose protocol lacks the deadlines or whose certificate produced no TLS context;
- `check_targets` lists each internal that is missing or not of the expected kind (the Config class and its
  parameters, the HTTP protocol's hooks, Ray's server builders and the gRPC bind functions, and that Ray still builds
  its servers through them); `check_patched` lists each patch that did not take effect. `setup_worker` raises
  `HardeningError` (one line: the Ray and uvicorn versions and what was not found) on either, so the worker does
  not start, and `scc serve` runs `check_targets` itself before Ray starts, so the service refuses to start with
  that line;
- after it is ready, `scc serve` checks the result from outside (scc.serve.selftest: TLS 1.1 refused, a stalled
  header closed in time, the socket table) and stops the service when a check fails.
"""
import importlib
import inspect
import os
import sys

from .loopback import BINDERS, GRPC_CERT_ENV, GRPC_KEY_ENV, HardeningError, bind_loopback, is_binder, refusal

HOOK = "scc.serve.proxy.setup_worker"
HEADER_TIMEOUT_ENV = "SCC_HEADER_TIMEOUT_S"
BODY_TIMEOUT_ENV = "SCC_BODY_TIMEOUT_S"
GRPC_MAX_MESSAGE_ENV = "RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"
# TLS 1.2: forward-secret key exchange and AEAD ciphers only (Mozilla's "intermediate" set); TLS 1.3 is always AEAD
TLS_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"
BODY_GRACE_S = 2.0  # the ingress answers 408 at --body-timeout-s; the proxy closes what is still open after this


def proxy_env(header_timeout_s: float, body_timeout_s: float, max_message_bytes: int, grpc_cert: str | None = None,
              grpc_key: str | None = None) -> dict[str, str]:
    """The environment of the service's Ray workers that configures the proxy (see the module docstring)."""
    env = {HEADER_TIMEOUT_ENV: f"{header_timeout_s:g}", BODY_TIMEOUT_ENV: f"{body_timeout_s + BODY_GRACE_S:g}",
           GRPC_MAX_MESSAGE_ENV: str(int(max_message_bytes))}
    if grpc_cert:
        env.update({GRPC_CERT_ENV: os.path.abspath(grpc_cert), GRPC_KEY_ENV: os.path.abspath(grpc_key)})
    return env


def setup_worker() -> None:
    """Ray's worker_process_setup_hook for the service: every patch target checked, loopback binds, the proxy's
    HTTP settings, every patch checked again; HardeningError (the worker does not start) when one is missing or
    did not take effect, or when the service's environment is absent."""
    header_s, body_s = _seconds(HEADER_TIMEOUT_ENV), _seconds(BODY_TIMEOUT_ENV)
    if header_s is None or body_s is None:
        raise HardeningError(f"{HOOK} needs {HEADER_TIMEOUT_ENV} and {BODY_TIMEOUT_ENV} (seconds) in the workers' "
                             "environment (scc.serve.proxy.proxy_env); refusing to start a proxy without read "
                             "deadlines")
    problems = check_targets()
    if problems:
        raise refusal(problems)
    bind_loopback()
    harden_http(header_s, body_s)
    problems = check_patched()
    if problems:
        raise refusal(problems, "not in effect after patching")


def _seconds(name: str) -> float | None:
    value = os.environ.get(name)
    try:
        return float(value) if value else None
    except ValueError:
        return None


def deadline_protocol(base: type, header_s: float, body_s: float) -> type:
    """A subclass of uvicorn's HTTP protocol `base` (httptools or h11) with per-connection read deadlines."""
    import asyncio

    class ReadDeadlines(base):
        _scc_deadlines = True
        _scc_timer: asyncio.TimerHandle | None = None
        _scc_state: tuple = (None, None)
        _scc_partial = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._scc_arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._scc_arm(received=True)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._scc_arm()

        def connection_lost(self, exc) -> None:
            if self._scc_timer is not None:
                self._scc_timer.cancel()
                self._scc_timer = None
            super().connection_lost(exc)

        def _scc_phase(self) -> str | None:
            cycle = self.cycle
            if cycle is None or cycle.response_complete:
                return "headers"
            return "body" if cycle.more_body else None  # None: the request is read, the answer is the app's

        def _scc_arm(self, received: bool = False) -> None:
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            state = (self._scc_phase(), self.cycle)
            if state == self._scc_state:  # bytes that did not finish the headers: a request has started
                self._scc_partial = self._scc_partial or (received and state[0] == "headers")
                return
            if self._scc_timer is not None:
                self._scc_timer.cancel()
                self._scc_timer = None
            self._scc_state, self._scc_partial = state, False
            if state[0] is not None:
                self._scc_timer = self.loop.call_later(header_s if state[0] == "headers" else body_s,
                                                       self._scc_expire)

        def _scc_expire(self) -> None:
            self._scc_timer = None
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            phase, cycle = self._scc_state
            answered = cycle is not None and cycle.response_started and not cycle.response_complete
            # an idle kept-alive connection is closed without a word (the client may be sending its next request);
            # one that started a request and did not finish it in time gets a 408 first
            if not answered and (phase == "body" or self._scc_partial):
                what = "request headers" if phase == "headers" else "request body"
                limit = header_s if phase == "headers" else body_s
                body = (b'{"error": "the ' + what.encode() + b' did not arrive within ' + f"{limit:g}".encode() +
                        b' s; send the whole request at once", "code": "timeout"}')
                transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
                                b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" +
                                body)
            transport.close()

    ReadDeadlines.__name__ = ReadDeadlines.__qualname__ = f"ReadDeadlines{base.__name__}"
    return ReadDeadlines


def harden_http(header_s: float, body_s: float) -> None:
    """In this process, make every uvicorn server use read deadlines (header_s, body_s) and the TLS settings above
    (idempotent). uvicorn's Config class itself is patched, so the name Ray builds it by does not matter; its
    `load` raises HardeningError when the server it prepares lacks the deadlines or, with a certificate, TLS."""
    import functools
    import ssl

    from uvicorn.config import HTTP_PROTOCOLS, Config
    from uvicorn.importer import import_from_string

    if getattr(Config.__init__, "_scc_hardened", False):
        return
    init, load = Config.__init__, Config.load

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        http = kwargs.get("http", "auto")
        base = import_from_string(HTTP_PROTOCOLS.get(http, http)) if isinstance(http, str) else http
        kwargs["http"] = base if getattr(base, "_scc_deadlines", False) else deadline_protocol(base, header_s, body_s)
        kwargs["ssl_ciphers"] = TLS_CIPHERS
        init(self, *args, **kwargs)

    @functools.wraps(load)
    def hardened_load(self) -> None:
        load(self)
        if not getattr(self.http_protocol_class, "_scc_deadlines", False):
            raise refusal([f"uvicorn {self.http_protocol_class.__name__} (the HTTP protocol with read deadlines; "
                           "an option Ray passes replaced it)"], "not in effect")
        if self.ssl is not None:
            self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2
            self.ssl.set_ciphers(TLS_CIPHERS)
            self.ssl.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
        elif getattr(self, "ssl_certfile", None):
            raise refusal(["uvicorn's TLS context for ssl_certfile"], "not in effect")

    __init__._scc_hardened = hardened_load._scc_hardened = True
    Config.__init__, Config.load = __init__, hardened_load


# ------------------------------------------------------------------------------------------------------------------
# Fail closed: what the patches need, and whether they took effect
# ------------------------------------------------------------------------------------------------------------------
PROTOCOL_HOOKS = ("connection_made", "data_received", "on_response_complete", "connection_lost")
PROTOCOL_FIELDS = ("cycle", "transport", "loop")  # what ReadDeadlines reads of uvicorn's protocol...
CYCLE_FIELDS = ("response_complete", "response_started", "more_body")  # ...and of its request/response cycle


def code_names(obj) -> set[str]:
    """Every global and attribute name the code of `obj` (a function, a class or a module: the functions and classes
    defined in it, nested code included, not those it imports) refers to."""
    names: set[str] = set()
    seen: set[int] = set()

    def walk_code(code) -> None:
        names.update(code.co_names)
        for const in code.co_consts:
            if inspect.iscode(const):
                walk_code(const)

    def walk(value, owner: str) -> None:
        if id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        if isinstance(value, property):
            for f in (value.fget, value.fset, value.fdel):
                if f is not None:
                    walk(f, owner)
        elif inspect.isfunction(value) and value.__module__ == owner:
            walk_code(inspect.unwrap(value).__code__)
        elif inspect.isclass(value) and value.__module__ == owner:
            for v in vars(value).values():
                walk(v, owner)

    if inspect.ismodule(obj):
        for v in list(vars(obj).values()):
            walk(v, obj.__name__)
    else:
        walk(obj, getattr(obj, "__module__", ""))
    return names


def _module(name: str, problems: list[str]):
    try:
        return importlib.import_module(name)
    except Exception:  # an import that fails for any reason is a missing target
        problems.append(f"module {name}")
        return None


def _protocol_problems(protocol) -> list[str]:
    """What ReadDeadlines needs of uvicorn's HTTP protocol class and of its module's RequestResponseCycle."""
    where = f"{getattr(protocol, '__module__', '?')}.{getattr(protocol, '__name__', protocol)}"
    if not inspect.isclass(protocol):
        return [f"{where} (an HTTP protocol class)"]
    problems = [f"{where}.{hook}" for hook in PROTOCOL_HOOKS if not callable(getattr(protocol, hook, None))]
    if not set(PROTOCOL_FIELDS) <= code_names(protocol):
        problems.append(f"{where}'s {', '.join(PROTOCOL_FIELDS)}")
    cycle = getattr(sys.modules.get(protocol.__module__), "RequestResponseCycle", None)
    if not inspect.isclass(cycle) or not set(CYCLE_FIELDS) <= code_names(cycle):
        problems.append(f"{protocol.__module__}.RequestResponseCycle's {', '.join(CYCLE_FIELDS)}")
    return problems


def _calls(module, function: str, name: str) -> bool:
    """Whether `module` has a plain function `function` whose code refers to `name`."""
    fn = getattr(module, function, None)
    return inspect.isfunction(fn) and name in code_names(fn)


def _ray_configs(http_util) -> list[tuple[str, object]]:
    """Each uvicorn Config class Ray's http_util can reach: `uvicorn.Config` and a bare imported `Config`."""
    out = []
    if inspect.ismodule(getattr(http_util, "uvicorn", None)):
        out.append(("uvicorn.Config", getattr(http_util.uvicorn, "Config", None)))
    if hasattr(http_util, "Config"):
        out.append(("Config", http_util.Config))
    return out


def check_targets() -> list[str]:
    """What the patches need that this process's Ray and uvicorn lack, one phrase each ([] when all is there):
    uvicorn's Config class with `http=` and `ssl_ciphers=` and a `load` method, the HTTP protocol's hooks and fields,
    Ray Serve building its HTTP server from that Config and binding its gRPC servers through the two functions
    scc.serve.loopback replaces (functions of (server, address)), and no other gRPC bind in those modules."""
    problems: list[str] = []
    uvicorn = _module("uvicorn", problems)
    config = _module("uvicorn.config", problems)
    importer = _module("uvicorn.importer", problems)
    config_class = getattr(config, "Config", None)
    if config is not None:
        if not inspect.isclass(config_class):
            problems.append("uvicorn.config.Config (a class)")
        else:
            try:
                params = set(inspect.signature(config_class.__init__).parameters)
            except (TypeError, ValueError):
                params = set()
            if not {"http", "ssl_ciphers"} <= params:
                problems.append("uvicorn.config.Config(http=..., ssl_ciphers=...)")
            if not inspect.isfunction(getattr(config_class, "load", None)):
                problems.append("uvicorn.config.Config.load (a method)")
            if uvicorn is not None and getattr(uvicorn, "Config", None) is not config_class:
                problems.append("uvicorn.Config (the class uvicorn.config.Config)")
        protocols = getattr(config, "HTTP_PROTOCOLS", None)
        import_from_string = getattr(importer, "import_from_string", None)
        if not (isinstance(protocols, dict) and isinstance(protocols.get("auto"), str)):
            problems.append("uvicorn.config.HTTP_PROTOCOLS['auto']")
        elif not callable(import_from_string):
            problems.append("uvicorn.importer.import_from_string")
        else:
            try:
                problems += _protocol_problems(import_from_string(protocols["auto"]))
            except Exception:
                problems.append(f"uvicorn's HTTP protocol {protocols['auto']}")
    http_util = _module("ray.serve._private.http_util", problems)
    if http_util is not None:
        if not _calls(http_util, "start_asgi_http_server", "Config"):
            problems.append("ray.serve._private.http_util.start_asgi_http_server (building a uvicorn Config)")
        for label, cls in _ray_configs(http_util):
            if config_class is not None and cls is not config_class:
                problems.append(f"ray.serve._private.http_util.{label} (the class uvicorn.config.Config)")
    grpc_util = _module("ray.serve._private.grpc_util", problems)
    if grpc_util is not None and not _calls(grpc_util, "start_grpc_server", "add_grpc_address"):
        problems.append("ray.serve._private.grpc_util.start_grpc_server (binding through add_grpc_address)")
    replica = _module("ray.serve._private.replica", problems)
    if replica is not None and "add_port_to_grpc_server" not in code_names(replica):
        problems.append("ray.serve._private.replica's gRPC server (bound through add_port_to_grpc_server)")
    for module in (m for m in (grpc_util, replica) if m is not None):
        direct = {"add_insecure_port", "add_secure_port"} & code_names(module)
        if direct:
            problems.append(f"{module.__name__} without a gRPC bind of its own (it calls {', '.join(sorted(direct))})")
    for module_name, name, _, _ in BINDERS:
        module = sys.modules.get(module_name) or _module(module_name, problems)
        fn = getattr(module, name, None) if module is not None else None
        if module is not None and not (is_binder(fn) or getattr(fn, "_scc_loopback", False)):
            problems.append(f"{module_name}.{name} (a function of (server, address))")
    return problems


def check_patched() -> list[str]:
    """Each patch of setup_worker that is not in effect in this process ([] when all are): uvicorn's Config
    hardened and the class every name of Ray's http_util reaches, a Config built with defaults carrying the read
    deadlines and TLS_CIPHERS, and every gRPC bind function of Ray Serve replaced."""
    problems: list[str] = []
    from uvicorn.config import Config

    if not (getattr(Config.__init__, "_scc_hardened", False) and getattr(Config.load, "_scc_hardened", False)):
        problems.append("uvicorn.config.Config's hardened __init__ and load")
    http_util = sys.modules.get("ray.serve._private.http_util")
    for label, cls in _ray_configs(http_util) if http_util is not None else [("module", None)]:
        if cls is not Config:
            problems.append(f"ray.serve._private.http_util.{label} (the hardened uvicorn Config)")
    try:
        probe = Config(app=lambda scope, receive, send: None, log_config=None)
        if not getattr(probe.http, "_scc_deadlines", False) or probe.ssl_ciphers != TLS_CIPHERS:
            problems.append("a uvicorn Config's read deadlines and TLS suites")
    except Exception as err:
        problems.append(f"a uvicorn Config built with defaults ({type(err).__name__})")
    for module_name, name, _, _ in BINDERS:
        if not getattr(getattr(sys.modules.get(module_name), name, None), "_scc_loopback", False):
            problems.append(f"{module_name}.{name} (replaced by the loopback bind)")
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("ray.serve") and module is not None:
            for _, name, _, _ in BINDERS:
                fn = getattr(module, name, None)
                if fn is not None and callable(fn) and not getattr(fn, "_scc_loopback", False):
                    problems.append(f"{module_name}.{name} (replaced by the loopback bind)")
    return problems


def preflight() -> None:
    """`scc serve`, before Ray starts: HardeningError (one line) when this installation's Ray or uvicorn lacks a
    patch target, the same check every worker of the service makes."""
    problems = check_targets()
    if problems:
        raise refusal(problems)
