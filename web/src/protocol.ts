// The /ws protocol (API.md section 3): frames in and out, parsed without trusting the input.
import type { ErrorBody, Message, MessageStatus } from "./api/types";

export type Op = "subscribe" | "unsubscribe" | "send" | "edit" | "delete" | "cancel" | "ping";

export type ServerFrame =
  | { op: "reply"; ref: string; ok: true; data: Record<string, unknown> }
  | { op: "reply"; ref: string; ok: false; error: ErrorBody }
  | ThreadEvent;

export type DurableEvent =
  | { op: "event"; thread_id: string; seq: number; type: "message.created" | "message.updated" | "message.deleted"; data: Message }
  | { op: "event"; thread_id: string; seq: number; type: "assistant.completed" | "assistant.failed"; data: ReplyEnd }
  | { op: "event"; thread_id: string; seq: number; type: "thread.summarized"; data: Record<string, unknown> };

export type EphemeralEvent =
  | { op: "event"; thread_id: string; seq: null; type: "assistant.started"; data: { message_id: string; text?: string } }
  | { op: "event"; thread_id: string; seq: null; type: "assistant.delta"; data: { message_id: string; index: number; text: string } };

export type ThreadEvent = DurableEvent | EphemeralEvent;

/** `assistant.completed` / `assistant.failed` payloads. */
export interface ReplyEnd {
  message_id: string;
  content: string;
  status: MessageStatus;
  cancelled?: boolean;
  reason?: string;
  message?: string;
}

type Obj = Record<string, unknown>;

function isObj(value: unknown): value is Obj {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

const MESSAGE_STATUSES: readonly string[] = ["streaming", "completed", "cancelled", "failed", "interrupted"];

export function isMessage(value: unknown): value is Message {
  return (
    isObj(value) &&
    typeof value.id === "string" &&
    typeof value.thread_id === "string" &&
    typeof value.seq === "number" &&
    typeof value.role === "string" &&
    typeof value.content === "string" &&
    typeof value.version === "number" &&
    typeof value.deleted === "boolean" &&
    typeof value.status === "string" &&
    MESSAGE_STATUSES.includes(value.status)
  );
}

function isReplyEnd(value: unknown): value is ReplyEnd {
  return (
    isObj(value) &&
    typeof value.message_id === "string" &&
    typeof value.content === "string" &&
    typeof value.status === "string" &&
    MESSAGE_STATUSES.includes(value.status)
  );
}

function isErrorBody(value: unknown): value is ErrorBody {
  return isObj(value) && typeof value.code === "string" && typeof value.message === "string";
}

/** A frame from the server, or null for anything this client does not understand. */
export function parseFrame(text: string): ServerFrame | null {
  let raw: unknown;
  try {
    raw = JSON.parse(text);
  } catch {
    return null;
  }
  if (!isObj(raw)) return null;
  if (raw.op === "reply" && typeof raw.ref === "string") {
    if (raw.ok === true) return { op: "reply", ref: raw.ref, ok: true, data: isObj(raw.data) ? raw.data : {} };
    if (raw.ok === false && isErrorBody(raw.error)) return { op: "reply", ref: raw.ref, ok: false, error: raw.error };
    return null;
  }
  if (raw.op !== "event" || typeof raw.thread_id !== "string" || typeof raw.type !== "string") return null;
  const { thread_id, data } = raw;
  if (!isObj(data)) return null;
  switch (raw.type) {
    case "message.created":
    case "message.updated":
    case "message.deleted":
      if (typeof raw.seq !== "number" || !isMessage(data)) return null;
      return { op: "event", thread_id, seq: raw.seq, type: raw.type, data };
    case "assistant.completed":
    case "assistant.failed":
      if (typeof raw.seq !== "number" || !isReplyEnd(data)) return null;
      return { op: "event", thread_id, seq: raw.seq, type: raw.type, data };
    case "thread.summarized":
      if (typeof raw.seq !== "number") return null;
      return { op: "event", thread_id, seq: raw.seq, type: raw.type, data };
    case "assistant.started":
      if (typeof data.message_id !== "string") return null;
      return {
        op: "event",
        thread_id,
        seq: null,
        type: "assistant.started",
        data: typeof data.text === "string" ? { message_id: data.message_id, text: data.text } : { message_id: data.message_id },
      };
    case "assistant.delta":
      if (typeof data.message_id !== "string" || typeof data.index !== "number" || typeof data.text !== "string") return null;
      return {
        op: "event",
        thread_id,
        seq: null,
        type: "assistant.delta",
        data: { message_id: data.message_id, index: data.index, text: data.text },
      };
    default:
      return null; // a newer server's event: ignored, never fatal
  }
}
