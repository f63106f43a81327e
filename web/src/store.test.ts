import { afterEach, beforeEach, describe, expect, it, vi } from "vitest";
import { Api, type Fetch } from "./api/http";
import { BACKOFF, Connection } from "./connection";
import { Store } from "./store";
import { FakeNetwork, FakeSocket, message } from "./testing";

type Handler = (url: URL, init: RequestInit) => { status: number; body?: unknown };

/** A fetch that answers from a table of (method path-prefix) handlers, recording every call. */
function fakeFetch(routes: Record<string, Handler>) {
  const calls: string[] = [];
  const fetchImpl: Fetch = async (input, init) => {
    const url = new URL(input, "http://test");
    const key = `${init.method ?? "GET"} ${url.pathname}`;
    calls.push(`${key}${url.search}`);
    const match = Object.entries(routes).find(([prefix]) => key.startsWith(prefix));
    if (!match) return new Response(JSON.stringify({ error: { code: "not_found", message: key, request_id: "r", details: {} } }), { status: 404 });
    const { status, body } = match[1](url, init);
    return new Response(body === undefined ? null : JSON.stringify(body), { status });
  };
  return { fetchImpl, calls };
}

const user = { id: "u1", email: "a@example.com" };
const project = { id: "p1", name: "P", monthly_budget_usd: null, spend_this_month_usd: 0, created_at: "", updated_at: "" };
const thread = { id: "t1", project_id: "p1", title: "T", message_count: 2, last_message_at: null, last_seq: 2, created_at: "", updated_at: "" };

function setup(extra: Record<string, Handler> = {}) {
  const { fetchImpl, calls } = fakeFetch({
    "GET /api/v1/auth/me": () => ({ status: 200, body: { user } }),
    "GET /api/v1/projects/p1": () => ({ status: 200, body: project }),
    "GET /api/v1/projects": () => ({ status: 200, body: { items: [project], next_cursor: null } }),
    "GET /api/v1/threads/t1/messages": () => ({ status: 200, body: { items: [message({ seq: 1 }), message({ seq: 2 })], next_cursor: null } }),
    "GET /api/v1/threads/t1": () => ({ status: 200, body: thread }),
    ...extra,
  });
  const network = new FakeNetwork();
  const store = new Store({
    api: new Api(fetchImpl),
    socketFactory: (url) => new FakeSocket(url),
    network,
    location: { pathname: "/p/p1/t/t1" },
    random: () => 0.5,
  } as ConstructorParameters<typeof Store>[0]);
  return { store, calls, network };
}

const flush = () => vi.advanceTimersByTimeAsync(0);

beforeEach(() => {
  FakeSocket.instances = [];
  vi.useFakeTimers();
});
afterEach(() => vi.useRealTimers());

describe("the store's WebSocket", () => {
  it("subscribes to the open thread with after_seq = the thread's last seq", async () => {
    const { store } = setup();
    store.start();
    await flush();
    expect(FakeSocket.instances).toHaveLength(1);
    const socket = FakeSocket.instances[0]!;
    socket.serverOpen();
    await flush();
    expect(socket.sent).toContainEqual(expect.objectContaining({ op: "subscribe", thread_id: "t1", after_seq: 2 }));
    expect(store.getSnapshot().connection).toBe("connected");
  });

  it("reconnects after a drop and resumes after the last seq it holds: nothing lost, nothing doubled", async () => {
    const { store } = setup();
    store.start();
    await flush();
    const first = FakeSocket.instances[0]!;
    first.serverOpen();
    await flush();
    first.reply("subscribe", { thread_id: "t1", last_seq: 2, replayed: 0 });
    first.serverSend({ op: "event", thread_id: "t1", seq: 3, type: "message.created", data: message({ seq: 3 }) });
    expect(store.getSnapshot().thread?.lastSeq).toBe(3);

    first.serverClose(1001); // server shutdown
    expect(store.getSnapshot().connection).toBe("reconnecting");
    expect(FakeSocket.instances).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(BACKOFF.maxMs);
    expect(FakeSocket.instances).toHaveLength(2);
    const second = FakeSocket.instances[1]!;
    second.serverOpen();
    expect(second.sent).toContainEqual(expect.objectContaining({ op: "subscribe", thread_id: "t1", after_seq: 3 }));
    // The replay repeats seq 3 (already held) and brings 4: one of each.
    second.serverSend({ op: "event", thread_id: "t1", seq: 3, type: "message.created", data: message({ seq: 3 }) });
    second.serverSend({ op: "event", thread_id: "t1", seq: 4, type: "message.created", data: message({ seq: 4 }) });
    expect(store.getSnapshot().thread?.messages.map((m) => m.seq)).toEqual([1, 2, 3, 4]);
  });

  it("sends an op again after retry_after_s when it is refused rate_limited, and gives up after a few", async () => {
    const { store } = setup();
    store.start();
    await flush();
    const socket = FakeSocket.instances[0]!;
    socket.serverOpen();
    await flush();
    const subscribes = () => socket.sent.filter((f) => f.op === "subscribe");
    const refuse = () => {
      const last = subscribes().at(-1)!;
      socket.serverSend({ op: "reply", ref: last.ref, ok: false, error: { code: "rate_limited", message: "slow down", request_id: "r", details: { retry_after_s: 0.2 } } });
    };
    expect(subscribes()).toHaveLength(1);
    refuse();
    await vi.advanceTimersByTimeAsync(199);
    expect(subscribes()).toHaveLength(1); // not before the server's retry_after_s
    await vi.advanceTimersByTimeAsync(1);
    expect(subscribes()).toHaveLength(2);
    expect(subscribes()[1]).toMatchObject({ thread_id: "t1", after_seq: 2 });
    expect(subscribes()[1]!.ref).not.toBe(subscribes()[0]!.ref);
    socket.reply("subscribe", { thread_id: "t1", last_seq: 2, replayed: 0 });
    await flush();
    expect(store.getSnapshot().alert).toBeNull();

    // Refused every time: BACKOFF.opRetries more sends, then the failure is shown.
    const failing = socket.sent.length;
    const conn = (store as unknown as { connection: Connection }).connection;
    const outcome = conn.request("subscribe", { thread_id: "t1", after_seq: 2 }).catch((e: unknown) => e);
    for (let i = 0; i <= BACKOFF.opRetries; i++) {
      await flush();
      refuse();
      await vi.advanceTimersByTimeAsync(200);
    }
    expect(socket.sent.length - failing).toBe(BACKOFF.opRetries + 1);
    expect(await outcome).toMatchObject({ name: "RequestFailed", body: { code: "rate_limited" } });
  });

  it("backs off exponentially with jitter while the server stays away", () => {
    const delays: number[] = [];
    const conn = new Connection({
      url: "/ws",
      socketFactory: (url) => new FakeSocket(url),
      random: () => 1,
      onOpen: () => undefined,
      onEvent: () => undefined,
      onStatus: () => undefined,
      onSessionLost: () => undefined,
    });
    for (let i = 0; i < 8; i++) delays.push(conn.nextDelay(0));
    expect(delays.slice(0, 4)).toEqual([500, 1000, 2000, 4000]);
    expect(Math.max(...delays)).toBe(BACKOFF.maxMs);
    const low = new Connection({ url: "/ws", socketFactory: (u) => new FakeSocket(u), random: () => 0, onOpen: () => undefined, onEvent: () => undefined, onStatus: () => undefined, onSessionLost: () => undefined });
    expect(low.nextDelay(0)).toBe(250); // half the ceiling is fixed, half random
  });

  it("waits long after 4029 and does not reconnect after 4001", async () => {
    const { store, calls } = setup();
    store.start();
    await flush();
    FakeSocket.instances[0]!.serverOpen();
    FakeSocket.instances[0]!.serverClose(4029);
    await vi.advanceTimersByTimeAsync(BACKOFF.rateLimitedMs - 1);
    expect(FakeSocket.instances).toHaveLength(1);
    await vi.advanceTimersByTimeAsync(BACKOFF.maxMs);
    expect(FakeSocket.instances).toHaveLength(2);

    FakeSocket.instances[1]!.serverOpen();
    const meCalls = calls.filter((c) => c.startsWith("GET /api/v1/auth/me")).length;
    FakeSocket.instances[1]!.serverClose(4001);
    await vi.advanceTimersByTimeAsync(BACKOFF.maxMs * 2);
    // The session is checked again (still valid here, so the socket is reopened once).
    expect(calls.filter((c) => c.startsWith("GET /api/v1/auth/me")).length).toBe(meCalls + 1);
    expect(FakeSocket.instances.length).toBeLessThanOrEqual(3);
  });

  it("goes Offline with the network and reconnects at once when it is back", async () => {
    const { store, network } = setup();
    store.start();
    await flush();
    FakeSocket.instances[0]!.serverOpen();
    network.set(false);
    expect(store.getSnapshot().connection).toBe("offline");
    expect(FakeSocket.instances[0]!.closed).not.toBeNull();
    await vi.advanceTimersByTimeAsync(60_000);
    expect(FakeSocket.instances).toHaveLength(1);
    network.set(true);
    expect(FakeSocket.instances).toHaveLength(2);
    expect(store.getSnapshot().connection).toBe("reconnecting");
  });
});

describe("sending", () => {
  it("a failed send shows Not sent, and Retry resends the same client_msg_id", async () => {
    const bodies: Record<string, unknown>[] = [];
    let fail = true;
    const { store } = setup({
      "POST /api/v1/threads/t1/messages": (_url, init) => {
        const body = JSON.parse(String(init.body)) as Record<string, unknown>;
        bodies.push(body);
        if (fail) return { status: 503, body: { error: { code: "unavailable", message: "busy", request_id: "req-9", details: {} } } };
        return { status: 201, body: message({ seq: 3, content: String(body.content), client_msg_id: String(body.client_msg_id) }) };
      },
    });
    store.start();
    await flush();
    store.send("hello");
    expect(store.getSnapshot().thread?.locals[0]?.state).toBe("pending");
    await flush();
    const failed = store.getSnapshot().thread!.locals[0]!;
    expect(failed).toMatchObject({ state: "failed", requestId: "req-9" });
    fail = false;
    store.retry(failed.clientMsgId);
    await flush();
    expect(bodies.map((b) => b.client_msg_id)).toEqual([failed.clientMsgId, failed.clientMsgId]);
    const s = store.getSnapshot().thread!;
    expect(s.locals).toHaveLength(0);
    expect(s.messages.filter((m) => m.content === "hello")).toHaveLength(1);
  });

  it("an edit conflict raises an alert saying it changed, and shows the latest text", async () => {
    const latest = { ...message({ seq: 1, content: "theirs" }), version: 2 };
    const { store } = setup({
      "PATCH /api/v1/messages/": () => ({ status: 409, body: { error: { code: "version_conflict", message: "stale", request_id: "r2", details: { current_version: 2 } } } }),
      "GET /api/v1/messages/": () => ({ status: 200, body: latest }),
    });
    store.start();
    await flush();
    const original = { ...latest, content: "mine", version: 1 };
    expect(await store.edit(original, "my edit", 1)).toBe(false);
    expect(store.getSnapshot().alert?.text).toMatch(/changed/);
    expect(store.getSnapshot().alert?.requestId).toBe("r2");
  });
});
