"""The operator's page of `scc serve --ui`: drop or pick an image, see the defended answer beside the undefended one,
their top-k scores and the latency. One static page (no outside resources), served by the ingress at GET /ui.

With a token the page is behind it: GET /ui answers a small sign-in form until the browser holds the session cookie
that POST /ui/login sets for the right token (HttpOnly, SameSite=Strict, Path=/ui, Secure over HTTPS). Its value is
"<issue time>.<HMAC-SHA256>", keyed with a random secret of this service start (`session_key()`, made once by
`build_app` and handed to each ingress replica, never written anywhere) over the issue time and the token's digest:
it reveals nothing of the token, cannot be made from the token's digest alone, dies with the service (a restart
makes a new key) and with a token change, and is refused MAX_AGE_S (12 h) after it was issued whatever the browser
keeps. The page's own calls (POST /ui/classify) carry that cookie; the API (/v1/*) still wants the bearer token.
"""
import hashlib
import hmac
import secrets
import time

COOKIE = "scc_ui"
MAX_AGE_S = 12 * 3600  # a session cookie is refused this long after it was issued
CLOCK_SKEW_S = 60  # an issue time this far in the future is accepted (ingress replicas on hosts whose clocks differ)


def session_key() -> bytes:
    """A fresh random key for the session cookies of one service start."""
    return secrets.token_bytes(32)


def _mac(key: bytes, digest: bytes, issued: int) -> str:
    return hmac.new(key, b"scc-operator-page-v2\0" + digest + b"\0" + str(issued).encode(), hashlib.sha256).hexdigest()


def session_value(key: bytes, digest: bytes, now: float | None = None) -> str:
    """The session cookie's value, issued `now` (time.time()) for a server token whose SHA-256 is `digest`."""
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_mac(key, digest, issued)}"


def cookie_header(key: bytes, digest: bytes, secure: bool, now: float | None = None) -> str:
    return (f"{COOKIE}={session_value(key, digest, now)}; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={MAX_AGE_S}"
            + ("; Secure" if secure else ""))


def signed_in(cookies: dict, digest: bytes | None, key: bytes, now: float | None = None) -> bool:
    """Whether a request may see the page: always without a server token; otherwise its cookie must carry this
    service start's MAC over the token's digest and an issue time at most MAX_AGE_S old."""
    if digest is None:
        return True
    issued, _, mac = str(cookies.get(COOKIE, "")).partition(".")
    if not (issued.isascii() and issued.isdigit() and len(issued) <= 12):
        return False
    now = time.time() if now is None else now
    if not now - MAX_AGE_S <= int(issued) <= now + CLOCK_SKEW_S:
        return False
    return hmac.compare_digest(mac.encode("utf-8", "replace"), _mac(key, digest, int(issued)).encode())


STYLE = """
body { font: 15px/1.4 system-ui, sans-serif; margin: 0; background: #f4f5f7; color: #1d2330; }
header { background: #1d2330; color: #fff; padding: 12px 24px; display: flex; gap: 16px; align-items: baseline; }
header h1 { font-size: 18px; margin: 0; } header span { opacity: .75; font-size: 13px; }
main { padding: 20px 24px; max-width: 1100px; }
#drop { display: block; border: 2px dashed #8a93a6; border-radius: 8px; padding: 22px; text-align: center;
        background: #fff; cursor: pointer; }
#drop.over { border-color: #2b6cb0; background: #eef4fb; }
#row { display: flex; gap: 20px; margin-top: 20px; align-items: flex-start; }
#preview { width: 160px; min-height: 160px; background: #fff; border-radius: 8px; display: flex; align-items: center;
           justify-content: center; image-rendering: pixelated; }
#preview img { max-width: 160px; max-height: 160px; width: 160px; }
.card { flex: 1; background: #fff; border-radius: 8px; padding: 14px 16px; box-shadow: 0 1px 2px rgba(0,0,0,.08); }
.card h2 { font-size: 14px; margin: 0 0 4px; text-transform: uppercase; letter-spacing: .04em; color: #4a5366; }
.label { font-size: 26px; font-weight: 600; margin: 2px 0 10px; min-height: 34px; }
.bar { display: flex; align-items: center; gap: 8px; margin: 3px 0; font-size: 13px; }
.bar .name { width: 110px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.bar .track { flex: 1; background: #e6e8ee; height: 12px; border-radius: 6px; overflow: hidden; }
.bar .fill { background: #2b6cb0; height: 100%; }
.card.undefended .fill { background: #a0572b; }
.bar .value { width: 58px; text-align: right; font-variant-numeric: tabular-nums; }
.ms { color: #4a5366; font-size: 13px; margin-top: 8px; }
#status { margin-top: 12px; color: #4a5366; min-height: 20px; } #status.error { color: #b42318; }
form { background: #fff; padding: 20px; border-radius: 8px; max-width: 420px; }
input[type=password] { width: 100%; padding: 8px; margin: 8px 0 12px; box-sizing: border-box; }
"""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scc serve</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{style}</style></head>
<body><header><h1>scc serve</h1><span id="what">{what}</span></header>
<main>
  <label id="drop">Drop an image here, or click to pick one (PNG, JPEG, WebP)
    <input id="file" type="file" accept="image/png,image/jpeg,image/webp" hidden></label>
  <div id="status"></div>
  <div id="row">
    <div id="preview"></div>
    <div class="card defended" id="defended"><h2>Defended &middot; <span class="spec"></span></h2>
      <div class="label"></div><div class="bars"></div><div class="ms"></div></div>
    <div class="card undefended" id="undefended"><h2>Undefended</h2>
      <div class="label"></div><div class="bars"></div><div class="ms"></div></div>
  </div>
</main>
<script>
const drop = document.getElementById("drop"), input = document.getElementById("file");
const status = document.getElementById("status");
function show(id, answer, ms) {{
  const card = document.getElementById(id);
  card.querySelector(".label").textContent = answer.label;
  const bars = card.querySelector(".bars");
  bars.textContent = "";
  for (const [name, p] of Object.entries(answer.scores)) {{
    const row = document.createElement("div"); row.className = "bar";
    const n = document.createElement("span"); n.className = "name"; n.textContent = name;
    const t = document.createElement("span"); t.className = "track";
    const f = document.createElement("span"); f.className = "fill"; f.style.width = (100 * p).toFixed(1) + "%";
    f.style.display = "block"; t.appendChild(f);
    const v = document.createElement("span"); v.className = "value"; v.textContent = (100 * p).toFixed(1) + " %";
    row.append(n, t, v); bars.appendChild(row);
  }}
  card.querySelector(".ms").textContent = ms;
}}
async function classify(file) {{
  if (!file) return;
  status.className = ""; status.textContent = "classifying " + file.name + " ...";
  const url = URL.createObjectURL(file);
  document.getElementById("preview").innerHTML = "";
  const img = document.createElement("img"); img.src = url; img.alt = file.name;
  document.getElementById("preview").appendChild(img);
  const start = performance.now();
  let reply, body;
  try {{
    reply = await fetch("/ui/classify?top_k=5", {{method: "POST", body: file,
                         headers: {{"Content-Type": file.type || "application/octet-stream"}}}});
    body = await reply.json();
  }} catch (err) {{
    status.className = "error"; status.textContent = "no answer: " + err; return;
  }}
  const roundTrip = performance.now() - start;
  if (!reply.ok || body.error) {{
    status.className = "error"; status.textContent = (body.code || reply.status) + ": " + body.error; return;
  }}
  const r = body.results[0];
  if (r.error) {{ status.className = "error"; status.textContent = r.error; return; }}
  document.querySelector("#defended .spec").textContent = body.spec;
  show("defended", r, "defended compute " + r.compute_ms.toFixed(1) + " ms, queue " + r.queue_ms.toFixed(1) +
       " ms");
  show("undefended", r.undefended, "undefended compute " + r.undefended.compute_ms.toFixed(1) + " ms");
  status.textContent = file.name + ": answered in " + roundTrip.toFixed(0) + " ms (server " +
                       body.latency_ms.toFixed(0) + " ms), draws " + body.draws;
  document.body.dataset.answered = String(Number(document.body.dataset.answered || 0) + 1);
}}
input.addEventListener("change", () => classify(input.files[0]));
drop.addEventListener("dragover", e => {{ e.preventDefault(); drop.classList.add("over"); }});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", e => {{ e.preventDefault(); drop.classList.remove("over");
                                     classify(e.dataTransfer.files[0]); }});
</script></body></html>
"""

LOGIN = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>scc serve: sign in</title><style>{style}</style></head>
<body><header><h1>scc serve</h1><span>operator page</span></header>
<main><form method="post" action="/ui/login">
  <div>This service needs its bearer token.</div>
  <input type="password" name="token" id="token" autocomplete="current-password" autofocus>
  <button type="submit" id="signin">Sign in</button>
  <div id="status" class="error">{message}</div>
</form></main></body></html>
"""


def page(what: str) -> str:
    """The operator page; `what` (the model and defense) is shown in its header."""
    import html

    return PAGE.format(style=STYLE, what=html.escape(what))


def login(message: str = "") -> str:
    import html

    return LOGIN.format(style=STYLE, message=html.escape(message))
