import { useVirtualizer } from "@tanstack/react-virtual";
import { useLayoutEffect, useMemo, useRef } from "react";
import { useStore } from "../hooks";
import { displayText, rows as toRows, type ThreadState } from "../thread";
import { LocalItem, MessageItem } from "./MessageItem";

const AT_BOTTOM_PX = 48;
const LOAD_OLDER_PX = 300;

/**
 * The conversation as a virtualised log (@tanstack/react-virtual, measured rows): only the rows
 * near the viewport are in the DOM. It follows new messages only while the reader is at the
 * bottom, and keeps the reader's place when older messages are loaded above.
 */
export function MessageList({ thread }: { thread: ThreadState }) {
  const store = useStore();
  const rows = useMemo(() => toRows(thread), [thread]);
  const scroller = useRef<HTMLDivElement>(null);
  const atBottom = useRef(true);
  const fromBottom = useRef(0);
  const firstKey = useRef<string | null>(null);

  // No React Compiler here: the virtualizer is read afresh on every render.
  // eslint-disable-next-line react-hooks/incompatible-library
  const virtualizer = useVirtualizer({
    count: rows.length,
    getScrollElement: () => scroller.current,
    estimateSize: () => 88,
    getItemKey: (index) => rows[index]?.key ?? index,
    overscan: 6,
    useFlushSync: false,
  });
  const total = virtualizer.getTotalSize();
  const last = rows[rows.length - 1];
  const lastText = last?.kind === "message" ? displayText(thread, last.message).length : 0;

  // Older messages arrived above: keep the same distance from the bottom (what the reader sees).
  useLayoutEffect(() => {
    const el = scroller.current;
    const key = rows[0]?.key ?? null;
    const previous = firstKey.current;
    firstKey.current = key;
    if (!el || previous === null || key === previous || atBottom.current) return;
    if (rows.some((row) => row.key === previous)) el.scrollTop = el.scrollHeight - fromBottom.current;
  }, [rows]);

  // New rows, streamed text or re-measured heights: follow them only from the bottom.
  useLayoutEffect(() => {
    const el = scroller.current;
    if (el && atBottom.current) el.scrollTop = el.scrollHeight;
  }, [total, rows.length, lastText]);

  const onScroll = () => {
    const el = scroller.current;
    if (!el) return;
    fromBottom.current = el.scrollHeight - el.scrollTop;
    atBottom.current = el.scrollHeight - el.scrollTop - el.clientHeight <= AT_BOTTOM_PX;
    if (el.scrollTop < LOAD_OLDER_PX && thread.olderCursor) void store.loadOlder();
  };

  return (
    <div
      ref={scroller}
      className="log"
      role="log"
      aria-label="Messages"
      aria-live="off"
      tabIndex={0}
      onScroll={onScroll}
    >
      {rows.length === 0 && thread.loaded && <p className="empty">No messages yet. Say hello below.</p>}
      <div className="log-inner" style={{ height: total }}>
        {virtualizer.getVirtualItems().map((item) => {
          const row = rows[item.index];
          if (!row) return null;
          return (
            <div
              key={item.key}
              data-index={item.index}
              ref={virtualizer.measureElement}
              className="row"
              style={{ transform: `translateY(${item.start}px)` }}
            >
              {row.kind === "message" ? (
                <MessageItem
                  message={row.message}
                  text={displayText(thread, row.message)}
                  failure={thread.failures[row.message.id]}
                />
              ) : (
                <LocalItem local={row.local} />
              )}
            </div>
          );
        })}
      </div>
    </div>
  );
}
