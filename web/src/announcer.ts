// What a screen reader hears of a streaming reply: whole sentences, at most every 2 s, and the
// rest once when the reply ends; never token by token. Plain TS: the store feeds it text and
// renders what it emits into a polite live region (role status).
export const ANNOUNCE_EVERY_MS = 2000;

// A sentence ends at . ! ? or … followed by white space (while streaming, a final "." could
// still become "...", or "3." become "3.5").
const SENTENCE_END = /[.!?…]["')\]]*\s/g;

export interface Clock {
  now(): number;
  setTimeout(fn: () => void, ms: number): unknown;
  clearTimeout(handle: unknown): void;
}

export const realClock: Clock = {
  now: () => Date.now(),
  setTimeout: (fn, ms) => setTimeout(fn, ms),
  clearTimeout: (handle) => clearTimeout(handle as ReturnType<typeof setTimeout>),
};

/** The end of the last complete sentence in `text` at or after `from`, or -1. */
export function lastSentenceEnd(text: string, from: number): number {
  let end = -1;
  SENTENCE_END.lastIndex = from;
  for (let m = SENTENCE_END.exec(text); m !== null; m = SENTENCE_END.exec(text)) {
    end = m.index + m[0].length;
  }
  return end;
}

export class Announcer {
  private readonly emit: (text: string) => void;
  private readonly clock: Clock;
  private messageId: string | null = null;
  private text = "";
  private announced = 0;
  private lastEmit = -Infinity;
  private timer: unknown = null;

  constructor(emit: (text: string) => void, clock: Clock = realClock) {
    this.emit = emit;
    this.clock = clock;
  }

  /** The reply's whole text so far. */
  update(messageId: string, text: string): void {
    if (messageId !== this.messageId) this.reset(messageId, text);
    this.text = text;
    this.flush();
  }

  /** The reply ended: say what has not been said yet, once. */
  complete(messageId: string, text: string): void {
    if (messageId !== this.messageId) return; // never streamed here: nothing to finish
    this.cancelTimer();
    const rest = text.slice(this.announced).trim();
    this.messageId = null;
    if (rest) {
      this.lastEmit = this.clock.now();
      this.emit(rest);
    }
  }

  /** Stop announcing (thread closed). */
  clear(): void {
    this.cancelTimer();
    this.messageId = null;
  }

  private reset(messageId: string, text: string): void {
    this.cancelTimer();
    this.messageId = messageId;
    // A snapshot (joining mid-reply) is not read out: announcing starts from what is new.
    this.announced = lastSentenceEnd(text, 0) > 0 ? lastSentenceEnd(text, 0) : 0;
    this.text = text;
  }

  private flush(): void {
    const end = lastSentenceEnd(this.text, this.announced);
    if (end <= this.announced) return;
    const wait = this.lastEmit + ANNOUNCE_EVERY_MS - this.clock.now();
    if (wait > 0) {
      if (this.timer === null) {
        this.timer = this.clock.setTimeout(() => {
          this.timer = null;
          this.flush();
        }, wait);
      }
      return;
    }
    const sentences = this.text.slice(this.announced, end).trim();
    this.announced = end;
    this.lastEmit = this.clock.now();
    this.emit(sentences);
  }

  private cancelTimer(): void {
    if (this.timer !== null) this.clock.clearTimeout(this.timer);
    this.timer = null;
  }
}
