import { useEffect, useRef, useState, type KeyboardEvent } from "react";
import { useStore } from "../hooks";

/** Enter sends, Shift+Enter breaks the line; focus stays here after sending. */
export function Composer({ streaming, focusSignal }: { streaming: boolean; focusSignal: number }) {
  const store = useStore();
  const [text, setText] = useState("");
  const input = useRef<HTMLTextAreaElement>(null);

  useEffect(() => {
    input.current?.focus();
  }, [focusSignal]);

  const send = () => {
    if (!text.trim()) return;
    store.send(text);
    setText("");
    input.current?.focus();
  };

  const onKeyDown = (event: KeyboardEvent<HTMLTextAreaElement>) => {
    if (event.key === "Enter" && !event.shiftKey && !event.nativeEvent.isComposing) {
      event.preventDefault();
      send();
    }
  };

  return (
    <form
      className="composer"
      aria-label="Composer"
      onSubmit={(e) => {
        e.preventDefault();
        send();
      }}
    >
      <label htmlFor="composer-input" className="visually-hidden">
        Message
      </label>
      <textarea
        id="composer-input"
        ref={input}
        rows={2}
        value={text}
        placeholder="Write a message (Enter sends, Shift+Enter for a new line)"
        onChange={(e) => setText(e.target.value)}
        onKeyDown={onKeyDown}
      />
      <div className="composer-actions">
        {streaming && (
          <button type="button" className="stop" onClick={() => void store.stop()}>
            Stop
          </button>
        )}
        <button type="submit">Send</button>
      </div>
    </form>
  );
}
