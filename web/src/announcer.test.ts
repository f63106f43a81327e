import { describe, expect, it } from "vitest";
import { ANNOUNCE_EVERY_MS, Announcer, type Clock } from "./announcer";

function fakeClock() {
  let now = 0;
  const timers: { at: number; fn: () => void }[] = [];
  const clock: Clock = {
    now: () => now,
    setTimeout: (fn, ms) => {
      const t = { at: now + ms, fn };
      timers.push(t);
      return t;
    },
    clearTimeout: (h) => {
      const i = timers.indexOf(h as (typeof timers)[number]);
      if (i >= 0) timers.splice(i, 1);
    },
  };
  const advance = (ms: number) => {
    now += ms;
    for (const t of [...timers].sort((a, b) => a.at - b.at)) {
      if (t.at <= now) {
        timers.splice(timers.indexOf(t), 1);
        t.fn();
      }
    }
  };
  return { clock, advance };
}

describe("Announcer", () => {
  it("announces whole sentences, at most every 2 s, and the rest once at completion", () => {
    const { clock, advance } = fakeClock();
    const said: string[] = [];
    const a = new Announcer((t) => said.push(t), clock);
    let text = "";
    for (const token of "One two. Three four. Five six seven".split(/(?= )/)) {
      text += token;
      a.update("m1", text);
      advance(100);
    }
    expect(said).toEqual(["One two."]);
    advance(ANNOUNCE_EVERY_MS);
    expect(said).toEqual(["One two.", "Three four."]);
    a.complete("m1", text);
    expect(said).toEqual(["One two.", "Three four.", "Five six seven"]);
    a.complete("m1", text);
    expect(said).toHaveLength(3);
  });

  it("never reads out token by token", () => {
    const { clock, advance } = fakeClock();
    const said: string[] = [];
    const a = new Announcer((t) => said.push(t), clock);
    let text = "";
    for (let i = 0; i < 200; i++) {
      text += `w${i}${i % 5 === 4 ? ". " : " "}`;
      a.update("m1", text);
      advance(20); // 50 tokens a second for 4 s
    }
    a.complete("m1", text);
    expect(said.length).toBeLessThanOrEqual(4); // ~every 2 s, plus the end
    expect(said.join(" ").replace(/\s+/g, " ").trim()).toBe(text.trim());
  });

  it("skips the snapshot of a reply joined mid-way", () => {
    const { clock } = fakeClock();
    const said: string[] = [];
    const a = new Announcer((t) => said.push(t), clock);
    a.update("m1", "Already said. Half");
    a.update("m1", "Already said. Half done. ");
    expect(said).toEqual(["Half done."]);
  });
});
