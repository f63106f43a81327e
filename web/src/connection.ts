// One WebSocket per tab, owned here (outside React). It reconnects with exponential back-off
// and jitter, tells its owner when it (re)opens so subscriptions can resume with after_seq,
// answers each request by `ref`, and reads the server's close codes (docs/architecture.md):
//   4001 token expired/revoked -> the session is over: no reconnect, owner told
//   4029 rate limited          -> reconnect, but only after a long pause
//   1001 shutdown, 4002 slow consumer, 4003 heartbeat timeout, 1011, 1006 ... -> reconnect
import { parseFrame, type Op, type ThreadEvent } from "./protocol";
import type { ErrorBody } from "./api/types";

export type ConnectionStatus = "idle" | "connecting" | "connected" | "reconnecting" | "offline";

export class RequestFailed extends Error {
  readonly body: ErrorBody;
  constructor(body: ErrorBody) {
    super(body.message);
    this.name = "RequestFailed";
    this.body = body;
  }
}

export class ConnectionLost extends Error {
  constructor() {
    super("The connection to the server was lost.");
    this.name = "ConnectionLost";
  }
}

/** The subset of the browser's WebSocket this module uses (tests pass a fake). */
export interface SocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open" | "close" | "message" | "error", listener: (event: Event) => void): void;
}
export type SocketFactory = (url: string) => SocketLike;

/** Window-like source of online/offline events (tests pass a fake). */
export interface NetworkWatch {
  isOnline(): boolean;
  addEventListener(type: "online" | "offline", listener: () => void): void;
}

export interface ConnectionOptions {
  url: string;
  socketFactory: SocketFactory;
  network?: NetworkWatch;
  random?: () => number;
  /** Called on every open: subscriptions resume here. */
  onOpen: () => void;
  onEvent: (event: ThreadEvent) => void;
  onStatus: (status: ConnectionStatus) => void;
  /** 4001, or a handshake refused: the owner checks the session. */
  onSessionLost: (reason: "closed_4001" | "handshake_failed") => void;
}

export const BACKOFF = {
  baseMs: 500,
  maxMs: 15_000,
  rateLimitedMs: 10_000,
  pingEveryMs: 25_000,
  pingTimeoutMs: 10_000,
  requestTimeoutMs: 15_000,
  /** An op refused `rate_limited` is sent again after `retry_after_s`, this many times at most. */
  opRetries: 5,
};

/** How long to wait before sending an op again, or null if its refusal is not `rate_limited`. */
export function rateLimitedWaitMs(error: unknown): number | null {
  if (!(error instanceof RequestFailed) || error.body.code !== "rate_limited") return null;
  const seconds = Number((error.body.details as { retry_after_s?: unknown } | undefined)?.retry_after_s);
  return Number.isFinite(seconds) ? Math.max(50, seconds * 1000) : 1000;
}

const OPEN = 1;

interface Pending {
  resolve: (data: Record<string, unknown>) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

export class Connection {
  private readonly options: ConnectionOptions;
  private socket: SocketLike | null = null;
  private wanted = false;
  private attempt = 0;
  private everOpened = false;
  private retryTimer: ReturnType<typeof setTimeout> | null = null;
  private pingTimer: ReturnType<typeof setInterval> | null = null;
  private readonly pending = new Map<string, Pending>();
  private nextRef = 1;
  private statusValue: ConnectionStatus = "idle";
  private watching = false;

  constructor(options: ConnectionOptions) {
    this.options = options;
  }

  get status(): ConnectionStatus {
    return this.statusValue;
  }

  /** Open (or keep) the socket. Idempotent: a second call never opens a second socket. */
  start(): void {
    this.wanted = true;
    this.watchNetwork();
    if (this.socket !== null || this.retryTimer !== null) return;
    if (this.options.network && !this.options.network.isOnline()) {
      this.setStatus("offline");
      return;
    }
    this.open();
  }

  /** Close for good (sign out). Pending requests fail with ConnectionLost. */
  stop(): void {
    this.wanted = false;
    this.clearRetry();
    const socket = this.socket;
    this.socket = null;
    this.stopPing();
    this.failPending();
    socket?.close(1000, "bye");
    this.setStatus("idle");
  }

  /** One op; resolves with the reply's data, rejects with RequestFailed or ConnectionLost.
   *  A `rate_limited` refusal (the op was not carried out) is sent again after the server's
   *  `retry_after_s`, up to `BACKOFF.opRetries` times: in a cluster a node's share of the user's
   *  budget can run dry for a moment before the budget itself is spent. */
  async request(op: Op, fields: Record<string, unknown> = {}): Promise<Record<string, unknown>> {
    for (let attempt = 0; ; attempt++) {
      try {
        return await this.requestOnce(op, fields);
      } catch (error) {
        const waitMs = rateLimitedWaitMs(error);
        if (waitMs === null || attempt >= BACKOFF.opRetries) throw error;
        await new Promise((resolve) => setTimeout(resolve, waitMs));
      }
    }
  }

  private requestOnce(op: Op, fields: Record<string, unknown>): Promise<Record<string, unknown>> {
    const socket = this.socket;
    if (socket === null || socket.readyState !== OPEN || this.statusValue !== "connected") {
      return Promise.reject(new ConnectionLost());
    }
    const ref = `r${this.nextRef++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(ref);
        reject(new ConnectionLost());
        // No answer in time: the socket is not trustworthy any more.
        this.drop(socket);
      }, BACKOFF.requestTimeoutMs);
      this.pending.set(ref, { resolve, reject, timer });
      socket.send(JSON.stringify({ op, ref, ...fields }));
    });
  }

  private watchNetwork(): void {
    const network = this.options.network;
    if (this.watching || !network) return;
    this.watching = true;
    network.addEventListener("offline", () => {
      if (!this.wanted) return;
      this.clearRetry();
      const socket = this.socket;
      this.socket = null;
      this.stopPing();
      this.failPending();
      socket?.close(1000, "offline");
      this.setStatus("offline");
    });
    network.addEventListener("online", () => {
      if (!this.wanted || this.socket !== null) return;
      this.clearRetry();
      this.attempt = 0;
      this.open();
    });
  }

  private open(): void {
    this.setStatus(this.everOpened ? "reconnecting" : "connecting");
    const socket = this.options.socketFactory(this.options.url);
    this.socket = socket;
    let opened = false;
    socket.addEventListener("open", () => {
      if (this.socket !== socket) return;
      opened = true;
      this.everOpened = true;
      this.attempt = 0;
      this.setStatus("connected");
      this.startPing(socket);
      this.options.onOpen();
    });
    socket.addEventListener("message", (event) => {
      if (this.socket !== socket) return;
      const data: unknown = (event as MessageEvent).data;
      if (typeof data === "string") this.onFrame(data);
    });
    socket.addEventListener("close", (event) => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.stopPing();
      this.failPending();
      this.onClosed((event as CloseEvent).code, opened);
    });
    // "error" is always followed by "close"; nothing to do here.
  }

  private onFrame(text: string): void {
    const frame = parseFrame(text);
    if (frame === null) return;
    if (frame.op === "reply") {
      const pending = this.pending.get(frame.ref);
      if (!pending) return;
      this.pending.delete(frame.ref);
      clearTimeout(pending.timer);
      if (frame.ok) pending.resolve(frame.data);
      else pending.reject(new RequestFailed(frame.error));
      return;
    }
    this.options.onEvent(frame);
  }

  private onClosed(code: number, opened: boolean): void {
    if (!this.wanted) {
      this.setStatus("idle");
      return;
    }
    if (code === 4001) {
      this.wanted = false;
      this.setStatus("idle");
      this.options.onSessionLost("closed_4001");
      return;
    }
    if (!opened) this.options.onSessionLost("handshake_failed");
    if (this.options.network && !this.options.network.isOnline()) {
      this.setStatus("offline");
      return;
    }
    this.setStatus("reconnecting");
    this.scheduleReconnect(code === 4029 ? BACKOFF.rateLimitedMs : 0);
  }

  /** Delay = an exponential ceiling with "equal jitter" (half fixed, half random), plus a floor. */
  nextDelay(floorMs: number): number {
    const random = this.options.random ?? Math.random;
    const ceiling = Math.min(BACKOFF.maxMs, BACKOFF.baseMs * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 10);
    return floorMs + ceiling / 2 + random() * (ceiling / 2);
  }

  private scheduleReconnect(floorMs: number): void {
    this.clearRetry();
    this.retryTimer = setTimeout(() => {
      this.retryTimer = null;
      if (this.wanted && this.socket === null) this.open();
    }, this.nextDelay(floorMs));
  }

  private drop(socket: SocketLike): void {
    if (this.socket !== socket) return;
    this.socket = null;
    this.stopPing();
    this.failPending();
    socket.close(4000, "no answer");
    this.onClosed(4000, true);
  }

  private startPing(socket: SocketLike): void {
    this.stopPing();
    this.pingTimer = setInterval(() => {
      this.request("ping").catch(() => undefined);
    }, BACKOFF.pingEveryMs);
    void socket;
  }

  private stopPing(): void {
    if (this.pingTimer !== null) clearInterval(this.pingTimer);
    this.pingTimer = null;
  }

  private clearRetry(): void {
    if (this.retryTimer !== null) clearTimeout(this.retryTimer);
    this.retryTimer = null;
  }

  private failPending(): void {
    for (const pending of this.pending.values()) {
      clearTimeout(pending.timer);
      pending.reject(new ConnectionLost());
    }
    this.pending.clear();
  }

  private setStatus(status: ConnectionStatus): void {
    if (status === this.statusValue) return;
    this.statusValue = status;
    this.options.onStatus(status);
  }
}

/** The WebSocket URL of this page's origin. */
export function socketUrl(location: { protocol: string; host: string }): string {
  return `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/ws`;
}
