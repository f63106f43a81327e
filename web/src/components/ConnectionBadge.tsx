import type { ConnectionStatus } from "../connection";

const LABELS: Record<ConnectionStatus, string> = {
  idle: "Offline",
  connecting: "Connecting",
  connected: "Connected",
  reconnecting: "Reconnecting",
  offline: "Offline",
};

export function ConnectionBadge({ status }: { status: ConnectionStatus }) {
  return (
    <div role="status" aria-label="Connection" className={`connection connection-${status}`}>
      <span aria-hidden="true" className="dot" />
      {LABELS[status]}
    </div>
  );
}
