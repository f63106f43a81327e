// Test doubles shared by the unit tests: a scriptable WebSocket and a network switch.
import type { Message } from "./api/types";
import type { NetworkWatch, SocketLike } from "./connection";

export class FakeSocket implements SocketLike {
  static instances: FakeSocket[] = [];
  readyState = 0;
  readonly url: string;
  readonly sent: Record<string, unknown>[] = [];
  readonly listeners = new Map<string, ((event: Event) => void)[]>();
  closed: { code?: number; reason?: string } | null = null;

  constructor(url: string) {
    this.url = url;
    FakeSocket.instances.push(this);
  }

  addEventListener(type: string, listener: (event: Event) => void): void {
    this.listeners.set(type, [...(this.listeners.get(type) ?? []), listener]);
  }

  send(data: string): void {
    this.sent.push(JSON.parse(data) as Record<string, unknown>);
  }

  close(code?: number, reason?: string): void {
    this.closed = { code, reason };
    this.readyState = 3;
  }

  private emit(type: string, event: object): void {
    for (const listener of this.listeners.get(type) ?? []) listener(event as Event);
  }

  // -- the server's side --
  serverOpen(): void {
    this.readyState = 1;
    this.emit("open", {});
  }
  serverSend(frame: object): void {
    this.emit("message", { data: JSON.stringify(frame) });
  }
  serverClose(code: number): void {
    this.readyState = 3;
    this.emit("close", { code });
  }
  /** Answer the last request of `op` with ok data. */
  reply(op: string, data: object = {}): Record<string, unknown> {
    const request = [...this.sent].reverse().find((f) => f.op === op);
    if (!request) throw new Error(`no ${op} sent; sent: ${JSON.stringify(this.sent)}`);
    this.serverSend({ op: "reply", ref: request.ref, ok: true, data });
    return request;
  }
}

export class FakeNetwork implements NetworkWatch {
  online = true;
  readonly listeners: Record<string, (() => void)[]> = { online: [], offline: [] };
  isOnline(): boolean {
    return this.online;
  }
  addEventListener(type: "online" | "offline", listener: () => void): void {
    this.listeners[type]?.push(listener);
  }
  set(online: boolean): void {
    this.online = online;
    for (const l of this.listeners[online ? "online" : "offline"] ?? []) l();
  }
}

let counter = 0;
export function message(overrides: Partial<Message> & { seq: number }): Message {
  counter += 1;
  return {
    id: `m${overrides.seq}-${counter}`,
    thread_id: "t1",
    role: "user",
    content: `message ${overrides.seq}`,
    status: "completed",
    version: 1,
    created_at: "2026-01-01T00:00:00Z",
    edited_at: null,
    deleted: false,
    deleted_at: null,
    client_msg_id: null,
    reply_to: null,
    model: null,
    ...overrides,
  };
}
