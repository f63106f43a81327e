import { useEffect } from "react";
import { useAppState, useStore } from "./hooks";
import { AlertBar } from "./components/AlertBar";
import { ConnectionBadge } from "./components/ConnectionBadge";
import { ProjectNav } from "./components/ProjectNav";
import { SignIn } from "./components/SignIn";
import { ThreadNav } from "./components/ThreadNav";
import { ThreadView } from "./components/ThreadView";

export function App() {
  const store = useStore();
  const state = useAppState();
  // Asks the server whether this browser has a session; idempotent, so StrictMode's second
  // run of this effect does nothing (store.test.tsx checks it).
  useEffect(() => store.start(), [store]);

  if (state.auth.status === "unknown") {
    return <p className="loading" role="status" aria-label="Loading">Loading…</p>;
  }
  if (state.auth.status === "signedOut") return <SignIn notice={state.auth.notice} />;

  return (
    <div className="app">
      <header className="topbar">
        <h1>Threadline</h1>
        <ConnectionBadge status={state.connection} />
        <span className="who">{state.auth.user.email}</span>
        <button type="button" onClick={() => void store.signOut()}>
          Sign out
        </button>
      </header>
      <ProjectNav />
      <ThreadNav />
      <main className="main" aria-label="Conversation">
        {state.threadId ? <ThreadView key={state.threadId} /> : <Placeholder hasProject={state.projectId !== null} />}
      </main>
      <AlertBar />
      <div role="status" aria-label="Reply announcements" className="visually-hidden">
        {state.announcement}
      </div>
    </div>
  );
}

function Placeholder({ hasProject }: { hasProject: boolean }) {
  return (
    <div className="placeholder">
      <p>{hasProject ? "Choose a thread, or start a new one." : "Choose a project, or create one."}</p>
    </div>
  );
}
