import { StrictMode } from "react";
import { createRoot } from "react-dom/client";
import { App } from "./App";
import { socketUrl } from "./connection";
import { StoreContext } from "./hooks";
import { Store } from "./store";
import "./styles.css";

// One store, and so one WebSocket, per tab: created here, outside React.
const store = new Store({
  socketUrl: socketUrl(window.location),
  network: { isOnline: () => navigator.onLine, addEventListener: (type, fn) => window.addEventListener(type, fn) },
  history: {
    pushState: (data: unknown, unused: string, url?: string | URL | null) => window.history.pushState(data, unused, url),
    addEventListener: (type, fn) => window.addEventListener(type, fn),
  },
  location: window.location,
});

const root = document.getElementById("root");
if (root === null) throw new Error("#root is missing from index.html");
createRoot(root).render(
  <StrictMode>
    <StoreContext value={store}>
      <App />
    </StoreContext>
  </StrictMode>,
);
