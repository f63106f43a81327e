// @vitest-environment happy-dom
import { StrictMode } from "react";
import { act } from "react";
import { createRoot } from "react-dom/client";
import { describe, expect, it } from "vitest";
import { App } from "./App";
import { Api, type Fetch } from "./api/http";
import { StoreContext } from "./hooks";
import { Store } from "./store";
import { FakeNetwork, FakeSocket } from "./testing";

(globalThis as { IS_REACT_ACT_ENVIRONMENT?: boolean }).IS_REACT_ACT_ENVIRONMENT = true;

const user = { id: "u1", email: "a@example.com" };
const fetchImpl: Fetch = async (input) => {
  const path = new URL(input, "http://test").pathname;
  if (path === "/api/v1/auth/me") return new Response(JSON.stringify({ user }), { status: 200 });
  if (path === "/api/v1/projects") return new Response(JSON.stringify({ items: [], next_cursor: null }), { status: 200 });
  return new Response("{}", { status: 404 });
};

describe("StrictMode", () => {
  it("opens exactly one WebSocket and registers each listener once", async () => {
    FakeSocket.instances = [];
    const network = new FakeNetwork();
    let popstate = 0;
    const store = new Store({
      api: new Api(fetchImpl),
      socketFactory: (url) => new FakeSocket(url),
      network,
      history: { pushState: () => undefined, addEventListener: () => (popstate += 1) },
      location: { pathname: "/" },
    });
    const container = document.createElement("div");
    document.body.append(container);
    const root = createRoot(container);
    await act(async () => {
      root.render(
        <StrictMode>
          <StoreContext value={store}>
            <App />
          </StoreContext>
        </StrictMode>,
      );
    });
    // Signed in (the double-run effect asked once), the app shell is on screen.
    await act(async () => {
      await new Promise((resolve) => setTimeout(resolve, 0));
    });
    expect(container.textContent).toContain("Sign out");
    expect(FakeSocket.instances).toHaveLength(1);
    const socket = FakeSocket.instances[0]!;
    for (const type of ["open", "message", "close"]) expect(socket.listeners.get(type)).toHaveLength(1);
    expect(network.listeners.online).toHaveLength(1);
    expect(network.listeners.offline).toHaveLength(1);
    expect(popstate).toBe(1);

    // Re-rendering (and StrictMode's re-run of effects) changes nothing.
    await act(async () => {
      socket.serverOpen();
    });
    expect(container.querySelector('[role="status"][aria-label="Connection"]')?.textContent).toContain("Connected");
    await act(async () => {
      root.render(
        <StrictMode>
          <StoreContext value={store}>
            <App />
          </StoreContext>
        </StrictMode>,
      );
    });
    expect(FakeSocket.instances).toHaveLength(1);
    for (const type of ["open", "message", "close"]) expect(socket.listeners.get(type)).toHaveLength(1);
    act(() => root.unmount());
  });
});
