import { createContext, useContext, useSyncExternalStore } from "react";
import type { State, Store } from "./store";

export const StoreContext = createContext<Store | null>(null);

export function useStore(): Store {
  const store = useContext(StoreContext);
  if (store === null) throw new Error("useStore outside <StoreContext>");
  return store;
}

/** The store's state; re-renders when it changes (one subscription per component). */
export function useAppState(): State {
  const store = useStore();
  return useSyncExternalStore(store.subscribe, store.getSnapshot);
}
