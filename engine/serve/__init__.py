"""The serving application: `scc serve`, the defended model as an HTTP service on Ray Serve, and its load test.

    pip install -e '.[serve]'
    scc serve --model scc-tiny-digits --defense scc --backend compiled --replicas 2 --port 8000
    curl -s -X POST --data-binary @seven.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/v1/classify?key=7'

    requests.py   HTTP body + query -> `Item`s (one per image; a part that cannot be decoded is an Item with its
                  error, a request with nothing readable a `RequestError` = 4xx)
    service.py    Service.handle_batch: Items -> results, in order: per-image draws from (seed, key), pad to the
                  engine's bucket, one runner call per chunk, slice, top-k; a bad item never fails the others.
                  EngineQueue: continuous batching in front of one engine
    app.py        the Ray Serve application (FastAPI ingress + @serve.batch), `build_app` is the `import_path` of
                  `scc serve --print-config` (`serve deploy`); `run` serves until SIGINT/SIGTERM. The only module
                  that imports Ray or FastAPI.
    client.py     a standard-library HTTP client (keep-alive, readiness)
    loadtest.py   `scc loadtest`: closed-loop load levels beside the in-process runner

Randomness: image b's draws are a function of (seed, key) only (scc.draws.keyed_draws). The service's seed is a
fresh secret unless --seed. A request may pass `key`, and `seed` only where the server was started with
--client-seeds (off by default: whoever picks the seed knows the draws; such requests get 403); then the answer
equals `scc.defend(clf, defense, seed=seed)(x, keys=[key])` on the eager module, whatever batch it was served in.
Keys that are decimal integers are ints (as a dataset index), any other key is a string. Images without a key get
a fresh uuid4 key under the service's seed.
"""
