import { memo, useEffect, useRef, useState } from "react";
import type { Message } from "../api/types";
import { useStore } from "../hooks";
import type { LocalEcho } from "../thread";

function author(role: Message["role"]): string {
  return role === "user" ? "You" : role === "assistant" ? "Assistant" : "System";
}

const ENDINGS: Partial<Record<Message["status"], string>> = {
  cancelled: "Stopped",
  failed: "Reply failed",
  interrupted: "Interrupted",
};

export const MessageItem = memo(function MessageItem({
  message,
  text,
  failure,
}: {
  message: Message;
  text: string;
  failure: string | undefined;
}) {
  const store = useStore();
  const [editing, setEditing] = useState<{ version: number; draft: string } | null>(null);
  const editButton = useRef<HTMLButtonElement>(null);
  const editor = useRef<HTMLTextAreaElement>(null);
  const wasEditing = useRef(false);
  const streaming = message.status === "streaming";
  const own = message.role === "user" && !message.deleted;

  useEffect(() => {
    if (editing) editor.current?.focus();
    else if (wasEditing.current) editButton.current?.focus();
    wasEditing.current = editing !== null;
  }, [editing]);

  const save = async () => {
    if (!editing) return;
    const draft = editing.draft.trim();
    if (!draft || draft === message.content) return setEditing(null);
    await store.edit(message, draft, editing.version);
    setEditing(null);
  };

  const ending = ENDINGS[message.status];
  return (
    <article
      className={`message message-${message.role}${message.deleted ? " deleted" : ""}`}
      aria-busy={streaming ? "true" : undefined}
      data-seq={message.seq}
      data-id={message.id}
    >
      <header>
        <span className="author">{author(message.role)}</span>
        {message.edited_at && !message.deleted && <span className="meta"> · edited</span>}
        {streaming && <span className="meta"> · writing…</span>}
        {ending && <span className="meta"> · {ending}</span>}
      </header>
      {message.deleted ? (
        <p className="text tombstone">This message was deleted.</p>
      ) : editing ? (
        <form
          className="editor"
          onSubmit={(e) => {
            e.preventDefault();
            void save();
          }}
        >
          <textarea
            ref={editor}
            aria-label="Edit message"
            value={editing.draft}
            onChange={(e) => setEditing({ ...editing, draft: e.target.value })}
            onKeyDown={(e) => {
              if (e.key === "Escape") setEditing(null);
              if (e.key === "Enter" && !e.shiftKey && !e.nativeEvent.isComposing) {
                e.preventDefault();
                void save();
              }
            }}
          />
          <div className="actions">
            <button type="submit">Save</button>
            <button type="button" onClick={() => setEditing(null)}>
              Cancel
            </button>
          </div>
        </form>
      ) : (
        <p className="text">{text}</p>
      )}
      {failure && message.status !== "completed" && <p className="failure">{failure}</p>}
      {own && !editing && (
        <div className="actions">
          <button
            type="button"
            ref={editButton}
            onClick={() => setEditing({ version: message.version, draft: message.content })}
          >
            Edit
          </button>
          <button type="button" onClick={() => void store.remove(message)}>
            Delete
          </button>
        </div>
      )}
    </article>
  );
});

export const LocalItem = memo(function LocalItem({ local }: { local: LocalEcho }) {
  const store = useStore();
  const failed = local.state === "failed";
  return (
    <article className={`message message-user ${failed ? "failed" : "pending"}`}>
      <header>
        <span className="author">You</span>
        <span className="meta"> · {failed ? "Not sent" : "Sending…"}</span>
      </header>
      <p className="text">{local.content}</p>
      {failed && (
        <div className="actions">
          {local.error && <p className="failure">{local.error}</p>}
          <button type="button" onClick={() => store.retry(local.clientMsgId)}>
            Retry
          </button>
        </div>
      )}
    </article>
  );
});
