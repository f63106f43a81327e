import { describe, expect, it } from "vitest";
import type { ThreadEvent } from "./protocol";
import { message } from "./testing";
import * as T from "./thread";

const created = (seq: number, data: ReturnType<typeof message>): ThreadEvent => ({
  op: "event",
  thread_id: "t1",
  seq,
  type: "message.created",
  data,
});

describe("optimistic send reconciled by client_msg_id", () => {
  it("shows a pending echo at once and replaces it with the server's message, once", () => {
    let s = T.addLocal(T.emptyThread("t1", 0), "c-1", "hello");
    expect(T.rows(s).map((r) => r.kind)).toEqual(["local"]);
    const sent = message({ seq: 1, content: "hello", client_msg_id: "c-1" });
    s = T.applyMessage(s, sent); // the REST answer
    s = T.applyEvent(s, created(1, sent)); // and the live event: still one row
    const rows = T.rows(s);
    expect(rows).toHaveLength(1);
    expect(rows[0]).toMatchObject({ kind: "message", key: "c:c-1" });
  });

  it("keeps the row key when pending becomes sent (no remount)", () => {
    const before = T.rows(T.addLocal(T.emptyThread("t1"), "c-9", "x"))[0]?.key;
    const after = T.rows(T.applyMessage(T.addLocal(T.emptyThread("t1"), "c-9", "x"), message({ seq: 3, client_msg_id: "c-9" })))[0]?.key;
    expect(before).toBe(after);
  });

  it("the event may come before the REST answer", () => {
    let s = T.addLocal(T.emptyThread("t1"), "c-2", "hi");
    s = T.applyEvent(s, created(1, message({ seq: 1, client_msg_id: "c-2" })));
    expect(s.locals).toHaveLength(0);
    s = T.failLocal(s, "c-2", "late failure", null); // a confirmed send cannot turn "Not sent"
    expect(T.rows(s)).toHaveLength(1);
    expect(s.locals).toHaveLength(0);
  });

  it("a failed send stays visible as Not sent, and a retry makes it pending again", () => {
    let s = T.addLocal(T.emptyThread("t1"), "c-3", "hey");
    s = T.failLocal(s, "c-3", "Sending failed", "req-1");
    expect(s.locals[0]).toMatchObject({ state: "failed", error: "Sending failed", requestId: "req-1" });
    s = T.addLocal(s, "c-3", "hey");
    expect(s.locals).toEqual([expect.objectContaining({ clientMsgId: "c-3", state: "pending" })]);
  });
});

describe("events", () => {
  it("applies durable events in order, ignores repeats, and remembers the last seq", () => {
    let s = T.emptyThread("t1", 0);
    const m1 = message({ seq: 1 });
    s = T.applyEvent(s, created(1, m1));
    const again = T.applyEvent(s, created(1, m1));
    expect(again).toBe(s);
    const edited = { ...m1, content: "edited", version: 2 };
    s = T.applyEvent(s, { op: "event", thread_id: "t1", seq: 2, type: "message.updated", data: edited });
    expect(s.lastSeq).toBe(2);
    expect(s.messages).toEqual([edited]);
    // A REST page read earlier (older version) does not undo the edit.
    s = T.applyPage(s, [m1], null, false);
    expect(s.messages[0]?.content).toBe("edited");
  });

  it("merges pages and events without doubling, ordered by seq", () => {
    let s = T.emptyThread("t1", 3);
    const [a, b, c, d] = [1, 2, 3, 4].map((seq) => message({ seq }));
    s = T.applyEvent(s, created(4, d!)); // live, seq 4 > lastSeq 3
    s = T.applyPage(s, [a!, b!, c!, d!], "cursor-older", false);
    s = T.applyPage(s, [a!, b!], null, true);
    expect(s.messages.map((m) => m.seq)).toEqual([1, 2, 3, 4]);
    expect(s.olderCursor).toBeNull();
  });

  it("ignores other threads' events", () => {
    const s = T.emptyThread("t1");
    expect(T.applyEvent(s, { ...created(1, message({ seq: 1 })), thread_id: "t2" })).toBe(s);
  });
});

describe("delta assembly", () => {
  const reply = message({ seq: 2, role: "assistant", status: "streaming", content: "", id: "a1" });
  const delta = (index: number, text: string): ThreadEvent => ({
    op: "event",
    thread_id: "t1",
    seq: null,
    type: "assistant.delta",
    data: { message_id: "a1", index, text },
  });

  it("appends deltas in index order and drops repeats", () => {
    let s = T.applyEvent(T.emptyThread("t1"), created(2, reply));
    s = T.applyEvent(s, { op: "event", thread_id: "t1", seq: null, type: "assistant.started", data: { message_id: "a1" } });
    for (const [i, text] of ["Hel", "lo", " there"].entries()) s = T.applyEvent(s, delta(i, text));
    s = T.applyEvent(s, delta(1, "lo"));
    expect(T.displayText(s, s.messages[0]!)).toBe("Hello there");
    expect(T.isStreaming(s)).toBe(true);
  });

  it("starts from the snapshot when joining mid-reply, then follows the live deltas", () => {
    let s = T.applyPage(T.emptyThread("t1", 2), [{ ...reply, content: "The sa" }], null, false);
    s = T.applyEvent(s, { op: "event", thread_id: "t1", seq: null, type: "assistant.started", data: { message_id: "a1", text: "The saved text" } });
    s = T.applyEvent(s, delta(7, " and more"));
    s = T.applyEvent(s, delta(7, " and more"));
    expect(T.displayText(s, s.messages[0]!)).toBe("The saved text and more");
  });

  it("the completion's content is final, and later deltas change nothing", () => {
    let s = T.applyEvent(T.emptyThread("t1"), created(2, reply));
    s = T.applyEvent(s, delta(0, "partial"));
    s = T.applyEvent(s, {
      op: "event",
      thread_id: "t1",
      seq: 3,
      type: "assistant.completed",
      data: { message_id: "a1", content: "partial, then stopped", status: "cancelled", cancelled: true },
    });
    s = T.applyEvent(s, delta(1, " late"));
    expect(T.displayText(s, s.messages[0]!)).toBe("partial, then stopped");
    expect(s.messages[0]?.status).toBe("cancelled");
    expect(T.isStreaming(s)).toBe(false);
    expect(s.streams).toEqual({});
  });
});
