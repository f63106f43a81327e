// The open thread's state as pure functions (no DOM, no React): server messages by seq, local
// echoes of sends not yet confirmed (Zulip-style), and the text of replies being streamed.
// Every function returns a new state; applying the same input twice changes nothing, so REST
// pages, replayed events and live events can overlap freely.
import type { Message } from "./api/types";
import type { ThreadEvent } from "./protocol";

export interface LocalEcho {
  clientMsgId: string;
  content: string;
  state: "pending" | "failed";
  error: string | null;
  requestId: string | null;
}

export interface Stream {
  text: string;
  /** Index of the last delta applied; null when the text came from a snapshot. */
  lastIndex: number | null;
}

export interface ThreadState {
  threadId: string;
  /** The seq of the latest durable event applied: resubscribe with after_seq = this. */
  lastSeq: number;
  messages: readonly Message[]; // ascending seq, one per id
  locals: readonly LocalEcho[]; // in send order, shown after the messages
  streams: Readonly<Record<string, Stream>>;
  failures: Readonly<Record<string, string>>; // message id -> why a reply failed
  olderCursor: string | null; // null: nothing older
  loaded: boolean;
}

export function emptyThread(threadId: string, lastSeq = 0): ThreadState {
  return { threadId, lastSeq, messages: [], locals: [], streams: {}, failures: {}, olderCursor: null, loaded: false };
}

/** Is `next` a later state of the same message than `current`? */
export function isNewer(current: Message, next: Message): boolean {
  if (next.version !== current.version) return next.version > current.version;
  if (current.status === "streaming" && next.status !== "streaming") return true;
  if (current.status === "streaming" && next.status === "streaming") return next.content.length > current.content.length;
  return false;
}

function indexBySeq(messages: readonly Message[], seq: number): number {
  let lo = 0;
  let hi = messages.length;
  while (lo < hi) {
    const mid = (lo + hi) >> 1;
    if ((messages[mid] as Message).seq < seq) lo = mid + 1;
    else hi = mid;
  }
  return lo;
}

function upsertAll(messages: readonly Message[], incoming: readonly Message[]): readonly Message[] {
  let result = messages;
  for (const message of incoming) {
    const at = indexBySeq(result, message.seq);
    const existing = result[at];
    if (existing !== undefined && existing.seq === message.seq) {
      if (existing.id === message.id && !isNewer(existing, message)) continue;
      const copy = result.slice();
      copy[at] = message;
      result = copy;
    } else {
      const copy = result.slice();
      copy.splice(at, 0, message);
      result = copy;
    }
  }
  return result;
}

function withMessages(state: ThreadState, incoming: readonly Message[]): ThreadState {
  const messages = upsertAll(state.messages, incoming);
  const confirmed = new Set(incoming.map((m) => m.client_msg_id).filter((id): id is string => id !== null));
  const locals = confirmed.size ? state.locals.filter((l) => !confirmed.has(l.clientMsgId)) : state.locals;
  let streams = state.streams;
  for (const m of incoming) {
    if (m.status !== "streaming" && m.id in streams) streams = without(streams, m.id);
  }
  if (messages === state.messages && locals === state.locals && streams === state.streams) return state;
  return { ...state, messages, locals, streams };
}

function without<V>(record: Readonly<Record<string, V>>, key: string): Readonly<Record<string, V>> {
  return Object.fromEntries(Object.entries(record).filter(([k]) => k !== key));
}

/** A page from REST (`older` = it was fetched from before what we hold). */
export function applyPage(state: ThreadState, items: readonly Message[], olderCursor: string | null, older: boolean): ThreadState {
  const next = withMessages(state, items);
  const cursor = older || !state.loaded ? olderCursor : state.olderCursor;
  return { ...next, olderCursor: cursor, loaded: true };
}

/** The server's answer to our own send (REST 200/201), or any single message we fetched. */
export function applyMessage(state: ThreadState, message: Message): ThreadState {
  if (message.thread_id !== state.threadId) return state;
  return withMessages(state, [message]);
}

export function addLocal(state: ThreadState, clientMsgId: string, content: string): ThreadState {
  const rest = state.locals.filter((l) => l.clientMsgId !== clientMsgId);
  if (state.messages.some((m) => m.client_msg_id === clientMsgId)) return state; // already confirmed
  return {
    ...state,
    locals: [...rest, { clientMsgId, content, state: "pending", error: null, requestId: null }],
  };
}

export function failLocal(state: ThreadState, clientMsgId: string, error: string, requestId: string | null): ThreadState {
  if (!state.locals.some((l) => l.clientMsgId === clientMsgId)) return state; // confirmed meanwhile
  return {
    ...state,
    locals: state.locals.map((l) => (l.clientMsgId === clientMsgId ? { ...l, state: "failed", error, requestId } : l)),
  };
}

/** One event of this thread, live or replayed. Durable ones at or below lastSeq are repeats. */
export function applyEvent(state: ThreadState, event: ThreadEvent): ThreadState {
  if (event.thread_id !== state.threadId) return state;
  if (event.seq !== null) {
    if (event.seq <= state.lastSeq) return state;
    const next = { ...state, lastSeq: event.seq };
    switch (event.type) {
      case "message.created":
      case "message.updated":
      case "message.deleted":
        return withMessages(next, [event.data]);
      case "assistant.completed":
      case "assistant.failed": {
        const data = event.data;
        const current = next.messages.find((m) => m.id === data.message_id);
        const streams = without(next.streams, data.message_id);
        const failures =
          event.type === "assistant.failed"
            ? { ...next.failures, [data.message_id]: data.message ?? data.reason ?? "The reply failed." }
            : next.failures;
        if (!current) return { ...next, streams, failures };
        const ended: Message = { ...current, content: data.content, status: data.status };
        const messages = next.messages.map((m) => (m.id === ended.id ? ended : m));
        return { ...next, messages, streams, failures };
      }
      default:
        return next;
    }
  }
  const id = event.data.message_id;
  const message = state.messages.find((m) => m.id === id);
  if (message !== undefined && message.status !== "streaming") return state; // already ended
  if (event.type === "assistant.started") {
    const stream: Stream = event.data.text !== undefined ? { text: event.data.text, lastIndex: null } : { text: "", lastIndex: -1 };
    return { ...state, streams: { ...state.streams, [id]: stream } };
  }
  const current = state.streams[id] ?? { text: "", lastIndex: null };
  if (current.lastIndex !== null && event.data.index <= current.lastIndex) return state; // a repeat
  const stream: Stream = { text: current.text + event.data.text, lastIndex: event.data.index };
  return { ...state, streams: { ...state.streams, [id]: stream } };
}

/** The text to show for a message: the live stream while it is longer than what is stored. */
export function displayText(state: ThreadState, message: Message): string {
  const stream = state.streams[message.id];
  if (message.status === "streaming" && stream !== undefined && stream.text.length >= message.content.length) {
    return stream.text;
  }
  return message.content;
}

/** Is a reply being generated in this thread right now? */
export function isStreaming(state: ThreadState): boolean {
  return state.messages.some((m) => m.role === "assistant" && m.status === "streaming");
}

export type Row =
  | { kind: "message"; key: string; message: Message }
  | { kind: "local"; key: string; local: LocalEcho };

/** The rows to render: keyed by client_msg_id where there is one, so pending -> sent keeps its row. */
export function rows(state: ThreadState): Row[] {
  const result: Row[] = state.messages.map((message) => ({
    kind: "message",
    key: message.client_msg_id !== null ? `c:${message.client_msg_id}` : message.id,
    message,
  }));
  for (const local of state.locals) result.push({ kind: "local", key: `c:${local.clientMsgId}`, local });
  return result;
}
