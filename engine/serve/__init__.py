"""The serving application: `scc serve`, the defended model as an HTTP(S)/gRPC service on Ray Serve, and its load test.

    pip install -e '.[serve]'
    scc serve --model scc-tiny-digits --defense scc --backend compiled --replicas 2 --port 8000
    curl -s -X POST --data-binary @seven.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/v1/classify?key=7'

    requests.py   query + body -> `Item`s, every limit checked before the work it bounds (part count while splitting,
                  pixel budgets from the image headers before any decoding); a bad part is an Item with its error,
                  a request with nothing usable a `RequestError` (4xx)
    service.py    what a model replica owns: Service.handle_batch (per-image draws, buckets, top-k; a bad item never
                  fails the others) and the bounded EngineQueue (continuous batching, deadlines, cancellation)
    front.py      the front door (plain Python): token, per-address cap, body before admission, decoding off the
                  event loop within the deadline, retries on a dead replica, 503 + Retry-After; one error shape
                  {"error": ..., "code": ...}
    grpc_api.py   the gRPC API (scc.v1.Classifier/Classify) without generated code
    app.py        the Ray Serve application: ingress + model deployments, `build_app` (the `serve deploy` import
                  path), `run` (serve until SIGINT/SIGTERM). The only module that imports Ray or FastAPI
    loopback.py   keeps a local Ray's ports on 127.0.0.1 and its cluster token out of ~/.ray
    proxy.py      what Ray Serve's proxy does not expose: header/body read deadlines, TLS versions and suites, gRPC
                  TLS and message size (set in every worker of the service by Ray's setup hook)
    client.py     a standard-library HTTP(S) client (keep-alive, token, multipart, readiness) and a gRPC one
    loadtest.py   `scc loadtest`: closed- or open-loop load, multi-image requests, HTTP or gRPC, memory sampling,
                  beside the in-process runner
    process.py    a local `scc serve` child process for tests and benchmarks (its processes, sockets, clean stop)

Randomness: image b's draws are a function of (seed, key) only (scc.draws.keyed_draws). By default the front door
draws a 128-bit secret for every request and gives each image that secret followed by its index in the request,
which the model replica mixes into its own secret seed: whatever keys a client sends, in one request or many, it
never meets the same draws twice (a fixed-draw oracle is what query attacks want). `scc serve
--replay-draws` (formerly --client-seeds) lets a request choose `?seed=` and makes (seed, key) the whole story: the
answer then equals `scc.defend(clf, defense, seed=seed)(x, keys=[key])` on the eager module, whatever batch it was
served in. Keys that are decimal integers are ints (as a dataset index), any other key is a string. Images without
a key get a fresh uuid4 key.
"""
