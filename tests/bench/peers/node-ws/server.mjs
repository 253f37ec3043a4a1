// The benchmark's peer: the hand-rolled Node.js server an agent platform would write with
// `ws`, speaking the gateway's protocol so that loadgen drives both the same way. One
// process, one event loop, every user's sockets in one shared map: exactly the design the
// gateway replaces, measured beside it. Not part of the product.
//
// The protocol as loadgen uses it: `GET /ws` with `Authorization: Bearer <HS256 JWT>` (or
// `?access_token=`), a `welcome` frame, `POST /v1/publish/batch` with a publisher token
// (scope `events:publish`) answering `{"results":[{"seq","user_id","queued"}]}`, and
// `{"type":"event","seq","kind","payload",...}` frames. Sensitive payload keys are redacted
// as the reference handler does (one parse and one stringify per event and connection).
//
// PORT and GATEWAY_JWT_SECRET come from the environment.

import { createHmac, timingSafeEqual, randomUUID } from "node:crypto";
import { createServer } from "node:http";
import { WebSocketServer } from "ws";

const SECRET = process.env.GATEWAY_JWT_SECRET ?? "";
const PORT = Number(process.env.PORT ?? 8080);
const MAX_BODY = 1 << 20;
const MAX_BUFFERED = 1 << 20; // a slower reader is a slow client (4000), as in the gateway

const SENSITIVE = new Set(["password", "passwd", "pwd", "secret", "clientsecret", "apikey", "token",
  "accesstoken", "refreshtoken", "idtoken", "authtoken", "bearertoken", "sessiontoken",
  "authorization", "cookie", "setcookie", "privatekey", "credential", "credentials"]);
const STEMS = ["pass", "pwd", "secret", "apikey", "token", "authorization", "cookie", "privatekey", "credential"];

/** user -> Set of sockets */
const sockets = new Map();
/** user -> last seq */
const seqs = new Map();

function verify(token) {
  const parts = (token ?? "").split(".");
  if (parts.length !== 3) return null;
  const mac = createHmac("sha256", SECRET).update(`${parts[0]}.${parts[1]}`).digest();
  const sig = Buffer.from(parts[2], "base64url");
  if (sig.length !== mac.length || !timingSafeEqual(sig, mac)) return null;
  let header;
  let claims;
  try {
    header = JSON.parse(Buffer.from(parts[0], "base64url"));
    claims = JSON.parse(Buffer.from(parts[1], "base64url"));
  } catch {
    return null;
  }
  if (header.alg !== "HS256" || typeof claims.sub !== "string" || !claims.sub) return null;
  if (typeof claims.exp !== "number" || claims.exp < Date.now() / 1000) return null;
  return claims;
}

function bearer(req) {
  const auth = req.headers.authorization;
  if (auth?.startsWith("Bearer ")) return auth.slice(7);
  return new URL(req.url, "http://x").searchParams.get("access_token");
}

function redact(value) {
  if (Array.isArray(value)) return value.map(redact);
  if (value === null || typeof value !== "object") return value;
  const out = {};
  for (const [key, inner] of Object.entries(value)) {
    out[key] = SENSITIVE.has(key.replace(/[-_]/g, "").toLowerCase()) ? "[redacted]" : redact(inner);
  }
  return out;
}

function frameFor(event, seq) {
  const text = JSON.stringify(event.payload ?? null);
  const norm = text.replace(/[-_]/g, "").toLowerCase();
  const payload = STEMS.some((s) => norm.includes(s)) ? JSON.stringify(redact(event.payload)) : text;
  let frame = `{"type":"event","seq":${seq},"kind":${JSON.stringify(event.kind)},"payload":${payload}`;
  if (event.run_id) frame += `,"run_id":${JSON.stringify(event.run_id)}`;
  if (event.thread_id) frame += `,"thread_id":${JSON.stringify(event.thread_id)}`;
  return `${frame}}`;
}

function json(res, status, value) {
  const body = JSON.stringify(value);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(body) });
  res.end(body);
}

function publish(events) {
  return events.map((event) => {
    const user = event.user_id;
    const seq = (seqs.get(user) ?? 0) + 1;
    seqs.set(user, seq);
    const targets = sockets.get(user);
    let queued = 0;
    if (targets) {
      const frame = frameFor(event, seq);
      for (const ws of targets) {
        if (ws.bufferedAmount > MAX_BUFFERED) {
          ws.close(4000, "slow client");
          continue;
        }
        ws.send(frame);
        queued += 1;
      }
    }
    return { seq, user_id: user, queued };
  });
}

const server = createServer((req, res) => {
  if (req.method === "GET" && (req.url === "/healthz" || req.url === "/readyz")) {
    return json(res, 200, { status: "ok" });
  }
  if (req.method === "POST" && (req.url === "/v1/publish/batch" || req.url === "/v1/publish")) {
    const claims = verify(bearer(req));
    if (!claims) return json(res, 401, { error: "unauthorized", reason: "invalid token" });
    if (!(claims.scope ?? "").split(" ").includes("events:publish")) {
      return json(res, 403, { error: "forbidden", reason: "token lacks the events:publish scope" });
    }
    const chunks = [];
    let size = 0;
    req.on("data", (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) req.destroy();
      else chunks.push(chunk);
    });
    req.on("end", () => {
      let body;
      try {
        body = JSON.parse(Buffer.concat(chunks));
      } catch {
        return json(res, 400, { error: "bad_request", reason: "invalid JSON" });
      }
      if (req.url === "/v1/publish") {
        const [receipt] = publish([body]);
        return json(res, 200, receipt);
      }
      if (!Array.isArray(body.events)) return json(res, 400, { error: "bad_request", reason: "events" });
      return json(res, 200, { results: publish(body.events) });
    });
    return;
  }
  json(res, 404, { error: "not_found", reason: req.url });
});

const wss = new WebSocketServer({ noServer: true, maxPayload: 64 << 10, perMessageDeflate: false });

server.on("upgrade", (req, socket, head) => {
  const claims = new URL(req.url, "http://x").pathname === "/ws" ? verify(bearer(req)) : null;
  if (!claims) {
    socket.end("HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n");
    return;
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const user = claims.sub;
    let set = sockets.get(user);
    if (!set) sockets.set(user, (set = new Set()));
    set.add(ws);
    ws.send(JSON.stringify({ type: "welcome", connection_id: randomUUID(), user_id: user, expires_at: claims.exp }));
    ws.on("message", (data) => {
      // The reference handler's ping, for parity; everything else is ignored.
      if (String(data).includes('"ping"')) ws.send(JSON.stringify({ type: "pong", user_id: user }));
    });
    ws.on("close", () => {
      set.delete(ws);
      if (set.size === 0) sockets.delete(user);
    });
    ws.on("error", () => {});
  });
});

server.listen(PORT, "127.0.0.1", () => {
  console.log(`node-ws peer listening on 127.0.0.1:${PORT}`);
});
for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => process.exit(0));
}
