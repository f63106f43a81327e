import { useAppState, useStore } from "../hooks";
import { isStreaming } from "../thread";
import { Composer } from "./Composer";
import { MessageList } from "./MessageList";

export function ThreadView() {
  const store = useStore();
  const { thread, threads, threadId, loadingOlder, focusComposer } = useAppState();
  const title = threads.items.find((t) => t.id === threadId)?.title || "Untitled";
  return (
    <section className="thread" aria-labelledby="thread-title">
      <h2 id="thread-title">{title}</h2>
      {thread?.olderCursor && (
        <button type="button" className="older" disabled={loadingOlder} onClick={() => void store.loadOlder()}>
          {loadingOlder ? "Loading older messages…" : "Load older messages"}
        </button>
      )}
      {thread ? <MessageList thread={thread} /> : <p className="loading">Loading…</p>}
      <Composer streaming={thread !== null && isStreaming(thread)} focusSignal={focusComposer} />
    </section>
  );
}
