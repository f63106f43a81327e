import { useAppState, useStore } from "../hooks";

/** Errors are announced (role alert) but never take focus. */
export function AlertBar() {
  const { alert } = useAppState();
  const store = useStore();
  if (!alert) return null;
  return (
    <div className="alert" role="alert" key={alert.id}>
      <p>{alert.text}</p>
      {alert.requestId && (
        <p className="request-id">
          Request ID for support: <code>{alert.requestId}</code>
        </p>
      )}
      <button type="button" onClick={() => store.dismissAlert()}>
        Dismiss
      </button>
    </div>
  );
}
