import { useAppState, useStore } from "../hooks";

const money = new Intl.NumberFormat("en-US", { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 4 });

export function ThreadNav() {
  const store = useStore();
  const { projects, projectId, threads, threadId } = useAppState();
  const project = projects.items.find((p) => p.id === projectId);
  if (!project) return <div className="threads" />;
  return (
    <nav aria-label="Threads" className="threads">
      <h2>{project.name}</h2>
      <p className="spend">
        This month: {money.format(project.spend_this_month_usd)}
        {project.monthly_budget_usd !== null && <> of {money.format(project.monthly_budget_usd)}</>}
      </p>
      <button type="button" onClick={() => void store.createThread()}>
        New thread
      </button>
      <ul>
        {threads.items.map((thread) => (
          <li key={thread.id}>
            <button
              type="button"
              className="nav-item"
              aria-current={thread.id === threadId ? "page" : undefined}
              onClick={() => void store.openThread(thread.id)}
            >
              {thread.title || "Untitled"}
            </button>
          </li>
        ))}
      </ul>
      {threads.loaded && threads.items.length === 0 && <p className="empty">No threads yet.</p>}
      {threads.next && (
        <button type="button" className="more" onClick={() => void store.loadMoreThreads()}>
          More threads
        </button>
      )}
    </nav>
  );
}
